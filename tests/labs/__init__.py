"""The labs' graders: grade_NAME.py per lab (run by `kvos lab grade`, not collected by the main suite),
their helpers (grading.py), the report plugin (report.py) and the stored wrong solutions (wrong.py)."""
