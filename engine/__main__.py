"""`python3 -m engine --model DIR [--port 8000] ...` starts the OpenAI-compatible server: engine/server.py."""

from .server import main

main()
