"""Ctrl-C on a 2-process run (torchrun passes SIGINT to its workers): the processes agree on the step to stop
at and the main process saves the network and the state once."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import time

from tests.dist_helpers import CAPTIONS, COLOURS, ROOT, env, torchrun
from tests.train_helpers import base_args, solid_dataset, tiny_model_dir


def test_ctrl_c_on_two_processes_saves_once(tmp_path):
    data = solid_dataset(tmp_path / "d", colours=COLOURS, caption=CAPTIONS, batch_size=2)
    argv = base_args(tiny_model_dir(), data, tmp_path / "out", "--max_train_steps", "2000", "--save_state")
    log = tmp_path / "log.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen(torchrun(2) + ["train_network.py", *argv], cwd=ROOT, env=env(), stdout=out,
                                stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 180
            while not re.search(r" [3-9]/2000| \d\d+/2000", log.read_text()) and time.time() < deadline:
                assert proc.poll() is None, log.read_text()[-3000:]
                time.sleep(0.2)
            proc.send_signal(signal.SIGINT)  # as a terminal's Ctrl-C reaches torchrun
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len(files) == 2 and files[0].endswith("-state") and files[1].endswith(".safetensors"), (files, text[-3000:])
    step = int(re.search(r"step(\d+)", files[1]).group(1))
    assert 3 <= step < 2000
    assert json.loads((tmp_path / "out" / files[0] / "progress.json").read_text())["global_step"] == step
    assert text.count("saved training state") == 1 and text.count("interrupted at step %d" % step) == 2
