"""servelab's grader: criteria per lab, run inline from notebooks (`check`) or on a whole notebook
(`python -m grader check PATH`), and the release step that turns solution notebooks into learner ones."""

from grader.spec import Context, Criterion, Fail, GradingError, Lab, Learner, Outcome, Result

__all__ = ["Context", "Criterion", "Fail", "GradingError", "Lab", "Learner", "Outcome", "Result"]
