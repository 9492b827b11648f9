import ast
from pathlib import Path

FORBIDDEN = {"service", "celery", "sqlalchemy", "fastapi", "kombu", "redis"}


def test_engine_imports_no_service_code():
    root = Path(__file__).resolve().parents[2] / "worker" / "kto"
    for f in root.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for n in names:
                assert n.split(".")[0] not in FORBIDDEN, f"{f.name} imports {n}"


def test_evaluate_load_callable():
    from worker.kto.evaluate import load_callable
    from worker.kto.toy import arithmetic_accuracy

    assert load_callable("worker.kto.toy:arithmetic_accuracy") is arithmetic_accuracy
    assert load_callable("worker.kto.toy.arithmetic_accuracy") is arithmetic_accuracy
    assert arithmetic_accuracy(["3+4=", "1+1="], ["7", "3"]) == 0.5
