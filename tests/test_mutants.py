"""The graders catch wrong implementations: every mutant of every exercise fails some graded test.

Each mutant (tests/mutants/exNN.py) is the reference with one realistic mistake; tests/mutation.py grades it in a
fresh process. Caught means some graded test failed; diagnosed means a failing test's name or message names the
mistake. CI fails unless every mutant is caught; the diagnosis rate is printed (`-s` shows it) and aimed at 100%.
"""

import pytest
from mutation import exercises_with_mutants, mutants_of, mutated_source, report, run_all

EXERCISES = exercises_with_mutants()


@pytest.mark.parametrize("exercise", EXERCISES)
def test_every_mutant_still_applies_to_the_reference(exercise):
    for mutant in mutants_of(exercise):
        source = mutated_source(exercise, mutant)  # raises if the reference no longer holds the mutated text once
        compile(source, mutant.file, "exec")


@pytest.mark.mutation
@pytest.mark.parametrize("exercise", EXERCISES)
def test_every_mutant_is_caught(exercise):
    verdicts = run_all(exercise)
    print("\n" + report(exercise, verdicts))
    missed = [v.mutant.name for v in verdicts if not v.caught]
    assert not missed, f"exercise {exercise}: these wrong implementations pass every graded test: {missed}"
    assert len(verdicts) >= 15, f"exercise {exercise} has only {len(verdicts)} mutants; aim for 15 or more"
