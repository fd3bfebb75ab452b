"""The real CLI through `ray job submit` against a `ray start --head` cluster; job status and a custom metric
are read back over HTTP from the dashboard API and the node's metrics endpoint."""

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from safediff.runtime.dashboard import job_status, prometheus_samples

pytestmark = pytest.mark.ray

RAY = str(Path(sys.executable).parent / "ray")
REPO = Path(__file__).resolve().parents[1]  # the checkout a user submits from


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    # every port Ray would otherwise take at a fixed default is chosen here, so that this head, alive for the whole
    # module, leaves the README test's defaults (6379, 8265, 8080, 52365, 10001) free
    ports = {name: _free_port() for name in ("gcs", "dashboard", "metrics", "agent", "client")}
    temp = tmp_path_factory.mktemp("ray")
    # as a user with the virtual environment activated: jobs then find its `python`
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run([RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={ports['gcs']}",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={ports['dashboard']}",
                    f"--metrics-export-port={ports['metrics']}", f"--dashboard-agent-listen-port={ports['agent']}",
                    f"--ray-client-server-port={ports['client']}", "--num-cpus=4", "--include-dashboard=true",
                    "--disable-usage-stats", f"--temp-dir={temp}"],
                   check=True, capture_output=True, timeout=180, env=env)
    yield ports
    _kill_under(temp)


def test_job_submit_runs_the_cli_and_exports_metrics(head, tiny_dir, tmp_path):
    dashboard = f"http://127.0.0.1:{head['dashboard']}"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("an image\na picture\n")
    job_id = f"safediff-test-{os.getpid()}"
    entrypoint = [
        "python", "-m", "safediff.cli", "run", "--config", "deploy/configs/cpu_demo.yaml",
        f"model.pretrained={tiny_dir / 'sd'}", f"reward.clip.model=local-dir:{tiny_dir / 'clip'}",
        f"prompts.sources=[{{path: {prompts}}}]", f"run.output_dir={tmp_path / 'runs'}", "run.name=jobtest",
        "run.steps=4", "sampler.num_steps=4", "grpo.train_timesteps=4", "cluster.cpus_per_rollout_actor=0.5",
        "cluster.cpus_per_reward_actor=0.5", "cluster.cpus_per_learner_worker=0.5"]
    for _ in range(60):  # a fresh head's job agent can take a while to come up: Ray says to try again later
        submitted = subprocess.run([RAY, "job", "submit", f"--address={dashboard}", f"--submission-id={job_id}",
                                    "--no-wait", f"--working-dir={REPO}", "--", *entrypoint], capture_output=True,
                                   text=True, timeout=300)
        if "No available agent to submit job" not in submitted.stderr:
            break
        time.sleep(2)
    assert submitted.returncode == 0, submitted.stderr[-3000:]

    seen_metric, status, deadline = [], "PENDING", time.time() + 600
    while time.time() < deadline:
        status = job_status(dashboard, job_id)
        samples = prometheus_samples(f"http://127.0.0.1:{head['metrics']}/metrics", "ray_safediff_reward_mean")
        seen_metric += [value for labels, value in samples if labels.get("run") == "jobtest"]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(2)
    logs = subprocess.run([RAY, "job", "logs", f"--address={dashboard}", job_id], capture_output=True, text=True)
    assert status == "SUCCEEDED", logs.stdout[-3000:]
    assert "adapter sha256" in logs.stdout
    assert seen_metric, "the run's reward gauge never appeared on the metrics endpoint"
    assert (tmp_path / "runs" / "jobtest" / "adapter" / "pytorch_lora_weights.safetensors").is_file()


def _readme_cluster_commands() -> str:
    """The first bash block under the README's "On a cluster" heading, as printed."""
    section = (REPO / "README.md").read_text().split("\n## On a cluster\n", 1)[1]
    return section.split("```bash\n", 1)[1].split("\n```", 1)[0]


@pytest.mark.slow
def test_the_readme_cluster_commands_run_as_printed(tmp_path):
    """A new user's shell: no token yet, RAY_AUTH_MODE unset, a token left by an earlier local ray.init() (the
    case that used to be refused), the README's commands run verbatim; the submitted world job must train a step.
    Only where Ray keeps its files (RAY_TMPDIR) and the home directory are this test's own."""
    commands = _readme_cluster_commands()
    assert "ray job submit" in commands and "RAY_AUTH_MODE=token" in commands
    taken = {port: holder for port in README_DEFAULT_PORTS if (holder := _listener(port))}
    assert not taken, f"the README's `ray start --head` needs these default ports, in use here: {taken}"
    home = tmp_path / "home"
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("0" * 64)  # left by an earlier local ray.init()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env.update(HOME=str(home), RAY_TMPDIR=str(ray_tmp),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    submit = commands[commands.index("ray job submit"):]  # the last command, with its continuation line
    shell = subprocess.Popen(["bash", "-euo", "pipefail", "-c", commands], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, agent_deadline, metrics, output = time.time() + 900, time.time() + 120, [], ""
        while time.time() < deadline and not metrics:
            if shell.poll() is not None:
                output = shell.stdout.read()
                if "No available agent to submit job, please try again later" not in output:
                    break
                agent_log = next(ray_tmp.glob("**/session_latest/logs/dashboard_agent.log"), None)
                assert time.time() < agent_deadline, (
                    "the head's job agent did not come up in 120 s; its log ends:\n"
                    + (agent_log.read_text()[-3000:] if agent_log else "(no dashboard_agent.log)"))
                # a fresh head's job agent can take a few seconds to come up: do as Ray says, submit again
                shell = subprocess.Popen(["bash", "-euo", "pipefail", "-c", f"export RAY_AUTH_MODE=token\n{submit}"],
                                         cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         text=True)
            metrics = [p for p in ray_tmp.glob("**/runs/world/metrics.jsonl") if p.read_text().strip()]
            time.sleep(2)
        assert metrics, f"no training step (shell exit {shell.poll()}):\n{output[-3000:]}"
        assert (home / ".ray" / "auth_token").stat().st_mode & 0o777 == 0o600
    finally:
        shell.kill()
        _kill_under(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)


README_DEFAULT_PORTS = (6379, 8265, 8080, 52365, 10001)  # GCS, dashboard, metrics, job agent, Ray client


def _listener(port: int) -> str | None:
    """The process listening on 127.0.0.1:`port` (its command line, or just "in use"), None if the port is free."""
    import psutil

    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) != 0:
            return None
    with contextlib.suppress(psutil.Error):
        for conn in psutil.net_connections("tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
                return " ".join(psutil.Process(conn.pid).cmdline())[:200]
    return "in use"


def _kill_under(root: Path) -> None:
    """Stop this head only (`ray stop` would stop every Ray cluster on the machine): the processes whose command line
    or working directory is under `root` (the job's driver runs in its working-directory copy there), and all their
    descendants, gathered before any is killed. The descendants include the raylet's dashboard and runtime-env agents,
    which rewrite their command line as `ray::DashboardAgent`; an agent orphaned by its raylet spins a core at nice 0
    for about a minute, starving the next test's actors (Ray runs workers at nice 15)."""
    import psutil

    head = []
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        with contextlib.suppress(psutil.Error):
            if str(root) in " ".join(proc.info["cmdline"] or ()) or str(root) in (proc.info["cwd"] or ""):
                head += [proc, *proc.children(recursive=True)]
    for proc in head:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    _, alive = psutil.wait_procs(head, timeout=60)
    assert not alive, f"still running 60 s after SIGKILL: {alive}"
