"""The GPU check's command runner: subprocesses with per-command limits inside one deadline,
their logs, and what a step's log says (tools/verify/gpu_check.py)."""
from __future__ import annotations

import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from mmctr.common import first_line

REPO = Path(__file__).resolve().parents[2]
RESERVE_S = 10.0  # kept back from the budget for writing the report


# ---------------------------------------------------------------------------------------------
# running commands with time limits
# ---------------------------------------------------------------------------------------------

class Runner:
    """Runs commands as subprocesses with per-command limits inside one overall deadline; every
    command's stdout and stderr go to logs/<name>.out|.err."""

    def __init__(self, logs: Path, budget_s: float, step_limits: dict[str, float], name: str = "gpu_check"):
        self.name = name  # what its progress lines start with
        self.started = time.monotonic()
        self.deadline = self.started + budget_s
        self.logs = logs
        self.logs.mkdir(parents=True, exist_ok=True)
        self.step_limits = step_limits  # --step-limit: a step's own limit, below the mode's
        self.steps: list[dict] = []
        self.lock = threading.Lock()
        # tools/bench.py imports the repo's package: found from src/ as in an installed checkout
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
        self.live: set = set()  # started and not yet reaped: killed if this script is interrupted

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def left(self) -> float:
        return self.deadline - RESERVE_S - time.monotonic()

    def say(self, text: str) -> None:
        print(f"[{self.name} {self.elapsed():5.0f} s] {text}", file=sys.stderr, flush=True)

    def record(self, step: dict) -> dict:
        with self.lock:
            self.steps.append(step)
        note = f" ({first_line(step.get('error'))[:160]})" if step.get("error") else ""
        self.say(f"{step['name']}: {step['status']} in {step['seconds']:.1f} s{note}")
        return step

    def skip(self, name: str, why: str) -> dict:
        return self.record({"name": name, "status": "skipped", "seconds": 0.0, "error": why})

    def start(self, name: str, argv: list[str], limit_s: float) -> dict:
        """Start a command; finish() waits for it. Not started (skipped) under 5 s of budget."""
        left = self.left()
        limit_s = min(limit_s, self.step_limits.get(name, math.inf), left)
        job = {"name": name, "command": shlex.join(argv), "timeout_s": round(limit_s, 1),
               "stdout": self.logs / f"{name}.out", "stderr": self.logs / f"{name}.err"}
        if left < 5:
            return job
        with open(job["stdout"], "wb") as out, open(job["stderr"], "wb") as err:
            job["proc"] = subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=err, env=self.env,
                                           start_new_session=True)  # its own group: killable whole
        self.live.add(job["proc"])
        job["t0"] = time.monotonic()
        return job

    def poll(self, job: dict) -> bool:
        """True once the job is over (finished, killed at its limit, or never started)."""
        if "proc" not in job or job["proc"].poll() is not None:
            return True
        if time.monotonic() - job["t0"] > job["timeout_s"]:
            self.kill(job["proc"])
            job["timed_out"] = True
            return True
        return False

    @staticmethod
    def kill(proc: subprocess.Popen) -> None:
        for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)  # the group this script started for the command
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=wait_s)
                return
            except subprocess.TimeoutExpired:
                continue

    def finish(self, job: dict) -> dict:
        while not self.poll(job):
            time.sleep(0.2)
        step = {"name": job["name"], "command": job["command"], "timeout_s": job["timeout_s"],
                "log": f"logs/{job['name']}.err"}
        if "proc" not in job:
            return self.record({**step, "status": "skipped", "seconds": 0.0,
                                "error": f"out of time: {max(0.0, self.left()):.0f} s of the budget left"})
        self.live.discard(job["proc"])
        step["seconds"] = round(time.monotonic() - job["t0"], 2)
        step["rc"] = job["proc"].returncode
        if job.get("timed_out"):
            step["status"] = "timeout"
            step["error"] = f"killed at its {job['timeout_s']:.0f} s limit"
        else:
            step["status"] = "ok" if step["rc"] == 0 else "failed"
            step["error"] = f"exit code {step['rc']}"
        if step["status"] == "ok":
            del step["error"]
        elif last := tail(job["stderr"]) or tail(job["stdout"]):
            # first line: why, and the command's last words (an "error: ..." line if it left one)
            errors = [line for line in last.splitlines() if line.lower().startswith(("error", "traceback"))
                      or "Error" in line]
            step["error"] += f": {(errors or last.splitlines())[-1].strip()[:300]}\n{last}"
        return self.record(step)

    def kill_all(self) -> None:
        for proc in list(self.live):
            self.kill(proc)

    def run(self, name: str, argv: list[str], limit_s: float) -> dict:
        return self.finish(self.start(name, argv, limit_s))

    def run_all(self, jobs: list[tuple[str, list[str], float]], parallel: int) -> dict:
        """Run (name, argv, limit) commands, `parallel` at a time, in order; returns name -> step."""
        pending, running, done = list(jobs), [], {}
        while pending or running:
            while pending and len(running) < parallel:
                name, argv, limit = pending.pop(0)
                job = self.start(name, argv, limit)
                if "proc" in job:
                    running.append(job)
                else:
                    done[name] = self.finish(job)  # recorded as skipped: out of time
            for job in [j for j in running if self.poll(j)]:
                running.remove(job)
                done[job["name"]] = self.finish(job)
            time.sleep(0.2)
        return done


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").replace("\r", "\n")
    except OSError:
        return ""
    kept = [line for line in text.splitlines() if line.strip() and not re.search(r"\d+%\|", line)]  # no tqdm
    return "\n".join(kept[-lines:])
