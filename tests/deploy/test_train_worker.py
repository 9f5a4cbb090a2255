"""Training has its own worker and queue in deploy/: one run at a time, and never on the workers that answer
shoppers or embed the catalog."""

import re
from pathlib import Path

from tests.deploy.test_deploy_files import compose, worker_services

PROCFILE = Path(__file__).resolve().parents[2] / "deploy" / "Procfile"


def test_training_runs_on_its_own_worker_one_at_a_time():
    workers = worker_services()
    assert [name for name, queues in workers.items() if "train" in queues] == ["worker-train"]
    assert workers["worker-train"] == {"train"}
    assert re.search(r"--concurrency 1\b", compose()["services"]["worker-train"]["command"])


def test_the_procfile_has_the_same_train_worker():
    lines = dict(line.split(":", 1) for line in PROCFILE.read_text().splitlines() if ":" in line)
    train = [name for name, command in lines.items() if re.search(r"-Q\s+\S*\btrain\b", command)]
    assert train == ["worker-train"]
    assert re.search(r"-Q train\b.*--concurrency 1\b", lines["worker-train"])
