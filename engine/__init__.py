"""inferlab's mini serving engine, built from the course's parts.

`engine.types` holds the request and statistics records shared by the step loop (exercise 07), the model runner and
the HTTP server; `engine.model_runner` runs one mixed prefill + decode forward over a paged KV pool;
`engine.sampler` turns logits into tokens; `engine.tokenizer` turns text into ids and back; `engine.parts` loads the
course's parts (block manager, scheduler, paged-attention kernel, GEMV) from `solutions/` or from the student's
`exercises/`.
"""
