"""Stand-in `sbatch`, `srun`, `scontrol` and `scancel` for running the real launch templates locally.

Tests put `tests/launch/fake_slurm/bin` first on PATH. Each tool records its argv in
`$FAKE_SLURM_DIR/calls.jsonl` and does locally what a cluster does, with the environment a real
cluster sets:

- `sbatch [opts] script [args]` reads `#SBATCH` lines plus the command line, allocates a job id,
  prints `Submitted batch job <id>` and runs the script to completion in the foreground (its own
  session, output to --output with %j/%x expanded). If the job asked to be requeued
  (`scontrol requeue <id>`) it runs the script again with SLURM_RESTART_COUNT incremented, as Slurm
  does for a requeued batch job. Each attempt's exit code goes to `jobs/<id>.json`.
- `srun [opts] cmd...` starts nodes x tasks-per-node tasks. Each "node" is one local process
  group; node names are loopback addresses (127.0.0.1, 127.0.0.2, ...) so the first node is a
  reachable rendezvous host. Tasks get SLURM_PROCID / SLURM_LOCALID / SLURM_NODEID / step
  variables; --output/--error with %t/%n/%N/%j expand per task; --kill-on-bad-exit ends the step
  when a task fails; signals received by srun are forwarded to every task; the exit code is the
  highest task exit code.
- `scontrol show hostnames <list>` expands `prefix[a-b,c]` lists; `scontrol requeue <id>` marks the
  job for a rerun.
- `sacct -o JobID,State,NodeList --parsable2 -j <ids>` reports the recorded states (submitit polls it);
  `sbatch --array=a-b` runs each array task as its own job, one after another. With
  FAKE_SLURM_BACKGROUND=1, sbatch returns at once and runs the job(s) in a detached process (as
  submitit expects: it writes the job's pickles after sbatch returns).
- `scancel [--signal=SIG] <id>` signals every task of the job's running steps (what Slurm does for
  `--signal=SIG@secs` without `B:`); without --signal it terminates them and the batch shell.

Knobs: FAKE_SLURM_DIR (required, state directory), FAKE_SLURM_MAX_REQUEUES (default 3).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


def state_dir() -> Path:
    root = os.environ.get("FAKE_SLURM_DIR")
    if not root:
        sys.exit("fake slurm: FAKE_SLURM_DIR is not set")
    path = Path(root)
    (path / "jobs").mkdir(parents=True, exist_ok=True)
    return path


def record(tool: str, argv: List[str], **extra) -> None:
    entry = {"tool": tool, "argv": argv, "time": time.time(), **extra}
    with open(state_dir() / "calls.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")


# ---------------------------------------------------------------- host lists


def expand_hostlist(text: str) -> List[str]:
    hosts: List[str] = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?", text):
        m = re.fullmatch(r"(.*)\[([^\]]*)\]", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges = m.groups()
        for rng in ranges.split(","):
            lo, _, hi = rng.partition("-")
            width = len(lo)
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{i:0{width}d}")
    return hosts


def loopback_nodelist(num_nodes: int) -> str:
    return f"127.0.0.[1-{num_nodes}]" if num_nodes > 1 else "127.0.0.1"


# ---------------------------------------------------------------- option parsing

# option -> (canonical name, takes a value)
_OPTIONS = {
    "-N": ("nodes", True), "--nodes": ("nodes", True),
    "-n": ("ntasks", True), "--ntasks": ("ntasks", True),
    "--ntasks-per-node": ("ntasks_per_node", True),
    "-J": ("job_name", True), "--job-name": ("job_name", True),
    "-o": ("output", True), "--output": ("output", True),
    "-e": ("error", True), "--error": ("error", True),
    "-t": ("time", True), "--time": ("time", True),
    "-p": ("partition", True), "--partition": ("partition", True),
    "-A": ("account", True), "--account": ("account", True),
    "-c": ("cpus_per_task", True), "--cpus-per-task": ("cpus_per_task", True),
    "--gpus-per-node": ("gpus_per_node", True), "--gres": ("gres", True),
    "--signal": ("signal", True), "--export": ("export", True), "--open-mode": ("open_mode", True),
    "--mem": ("mem", True), "--qos": ("qos", True), "--chdir": ("chdir", True), "-D": ("chdir", True),
    "--cpu-bind": ("cpu_bind", True), "--gpus-per-task": ("gpus_per_task", True),
    "--array": ("array", True), "--comment": ("comment", True), "--constraint": ("constraint", True),
    "--exclusive": ("exclusive", False), "--requeue": ("requeue", False), "--no-requeue": ("no_requeue", False),
    "--parsable": ("parsable", False), "-K": ("kill_on_bad_exit", False), "--label": ("label", False),
    "-l": ("label", False), "--unbuffered": ("unbuffered", False), "-u": ("unbuffered", False),
    "--kill-on-bad-exit": ("kill_on_bad_exit", False), "--wait": ("wait_flag", False), "-W": ("wait_flag", False),
}


def parse_options(argv: List[str]) -> Tuple[Dict[str, str], List[str]]:
    """Slurm-style options up to the first non-option word; returns (options, rest)."""
    opts: Dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if not arg.startswith("-"):
            break
        name, eq, value = arg.partition("=")
        if name not in _OPTIONS:
            if not name.startswith("--"):
                sys.exit(f"fake slurm: unsupported option {arg!r} (add it to tests/launch/fake_slurm)")
            opts[name[2:].replace("-", "_")] = value if eq else "1"  # recorded, otherwise ignored
            i += 1
            continue
        key, takes_value = _OPTIONS[name]
        if takes_value:
            if not eq:
                i += 1
                value = argv[i]
            opts[key] = value
        else:
            opts[key] = value if eq else "1"
        i += 1
    return opts, argv[i:]


def sbatch_header(script: Path) -> List[str]:
    args: List[str] = []
    for line in script.read_text().splitlines():
        if line.startswith("#SBATCH"):
            args.extend(shlex.split(line[len("#SBATCH"):], comments=True))
        elif line.strip() and not line.startswith("#"):
            break  # sbatch stops reading directives at the first command
    return args


def expand_pattern(pattern: str, *, job_id: str, job_name: str = "", task: int = 0, node: int = 0,
                   nodename: str = "", step: str = "0", array_job: str = "", array_task: str = "") -> str:
    return (pattern.replace("%A", array_job or job_id).replace("%a", array_task or "0").replace("%j", job_id).replace("%x", job_name).replace("%t", str(task))
            .replace("%n", str(node)).replace("%N", nodename).replace("%s", step).replace("%%", "%"))


# ---------------------------------------------------------------- job records


def job_file(job_id: str) -> Path:
    return state_dir() / "jobs" / f"{job_id}.json"


def load_job(job_id: str) -> dict:
    path = job_file(job_id)
    return json.loads(path.read_text()) if path.exists() else {}


def save_job(job_id: str, job: dict) -> None:
    tmp = job_file(job_id).with_suffix(".tmp")
    tmp.write_text(json.dumps(job, indent=1))
    os.replace(tmp, job_file(job_id))


def new_job_id() -> str:
    counter = state_dir() / "next_job_id"
    # Start from a pid-derived base so jobs of different tests use different rendezvous ports.
    job_id = int(counter.read_text()) if counter.exists() else 1000 + (os.getpid() * 7) % 9000
    counter.write_text(str(job_id + 1))
    return str(job_id)


# ---------------------------------------------------------------- sbatch


def sbatch_main(argv: List[str]) -> int:
    record("sbatch", argv)
    cli_opts, rest = parse_options(argv)
    if not rest:
        sys.exit("sbatch: error: no batch script given")
    script = Path(rest[0])
    header_opts, _ = parse_options(sbatch_header(script))
    opts = {**header_opts, **cli_opts}
    main_id = new_job_id()
    if "array" in opts:  # each array task is its own job (own SLURM_JOB_ID)
        indices: List[int] = []
        for part in opts["array"].split("%")[0].split(","):
            lo, _, hi = part.partition("-")
            indices.extend(range(int(lo), int(hi or lo) + 1))
        tasks = [(main_id if n == 0 else new_job_id(), {"SLURM_ARRAY_JOB_ID": main_id, "SLURM_ARRAY_TASK_ID": str(i)})
                 for n, i in enumerate(indices)]
    else:
        tasks = [(main_id, {})]
    for job_id, extra in tasks:
        name = f"{extra['SLURM_ARRAY_JOB_ID']}_{extra['SLURM_ARRAY_TASK_ID']}" if extra else job_id
        save_job(job_id, {"id": job_id, "name": name, "state": "PENDING"})
    # Slurm keeps the batch script as submitted: the submitter may delete or rewrite its file right
    # after sbatch returns (submitit removes its submission file), so jobs run a copy.
    stored = state_dir() / "scripts" / f"{main_id}.sh"
    stored.parent.mkdir(parents=True, exist_ok=True)
    stored.write_bytes(script.read_bytes())
    print(main_id if "parsable" in opts else f"Submitted batch job {main_id}", flush=True)
    if os.environ.get("FAKE_SLURM_BACKGROUND") == "1" and os.fork() != 0:
        return 0  # like a real sbatch: return at once; the forked child runs the job(s)
    if os.environ.get("FAKE_SLURM_BACKGROUND") == "1":
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)  # release the caller's pipes
    for job_id, extra in tasks:  # one after another
        run_batch_job(job_id, script, rest[1:], opts, extra, stored=stored)
    return 0


def run_batch_job(job_id: str, script: Path, args: List[str], opts: Dict[str, str], extra_env: Dict[str, str],
                  *, stored: Path):
    """Runs `stored` (the script's contents at submission); `script` names the job."""
    nodes = int(opts.get("nodes", "1"))
    per_node = int(opts.get("ntasks_per_node") or (int(opts["ntasks"]) // nodes if "ntasks" in opts else 1))
    job_name = opts.get("job_name", script.name)
    nodelist = loopback_nodelist(nodes)
    array_name = f"{extra_env['SLURM_ARRAY_JOB_ID']}_{extra_env['SLURM_ARRAY_TASK_ID']}" if extra_env else job_id
    job = {"id": job_id, "name": array_name, "script": str(script), "args": args, "opts": opts, "attempts": [],
           "state": "RUNNING"}
    save_job(job_id, job)
    env = dict(os.environ)
    env.update({
        "SLURM_JOB_ID": job_id, "SLURM_JOBID": job_id, "SLURM_JOB_NAME": job_name,
        "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_NNODES": str(nodes),
        "SLURM_JOB_NODELIST": nodelist, "SLURM_NODELIST": nodelist,
        "SLURM_NTASKS": str(nodes * per_node), "SLURM_NPROCS": str(nodes * per_node),
        "SLURM_NTASKS_PER_NODE": str(per_node), "SLURM_TASKS_PER_NODE": f"{per_node}(x{nodes})",
        "SLURM_SUBMIT_DIR": os.getcwd(), "SLURM_SUBMIT_HOST": "127.0.0.1",
        "SLURMD_NODENAME": expand_hostlist(nodelist)[0], "SLURM_NODEID": "0", "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0", "SLURM_CLUSTER_NAME": "fake", "SLURM_JOB_PARTITION": opts.get("partition", "fake"),
        **extra_env,
    })
    if "gpus_per_node" in opts:
        env["SLURM_GPUS_PER_NODE"] = opts["gpus_per_node"]
    if "cpus_per_task" in opts:
        env["SLURM_CPUS_PER_TASK"] = opts["cpus_per_task"]
    max_requeues = int(os.environ.get("FAKE_SLURM_MAX_REQUEUES", "3"))
    restart = 0
    while True:
        if restart:
            env["SLURM_RESTART_COUNT"] = str(restart)
        output = expand_pattern(opts.get("output", "slurm-%j.out"), job_id=job_id, job_name=job_name,
                                array_job=extra_env.get("SLURM_ARRAY_JOB_ID", ""),
                                array_task=extra_env.get("SLURM_ARRAY_TASK_ID", ""))
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        mode = "a" if restart or opts.get("open_mode") == "append" else "w"
        with open(output, mode) as out:
            proc = subprocess.Popen(["bash", str(stored), *args], env=env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            job = load_job(job_id)
            job["batch_pgid"] = proc.pid
            save_job(job_id, job)
            rc = proc.wait()
        job = load_job(job_id)
        job["attempts"].append({"restart": restart, "rc": rc})
        requeue = state_dir() / "jobs" / f"{job_id}.requeue"
        if requeue.exists() and restart < max_requeues and job.get("state") != "CANCELLED":
            requeue.unlink()
            save_job(job_id, job)
            restart += 1
            continue
        if job.get("state") != "CANCELLED":
            job["state"] = "COMPLETED" if rc == 0 else "FAILED"
        save_job(job_id, job)
        return


def sacct_main(argv: List[str]) -> int:
    """`sacct -o JobID,State,NodeList --parsable2 -j <ids>` as submitit asks it."""
    record("sacct", argv)
    wanted = argv[argv.index("-j") + 1].split(",") if "-j" in argv else []
    print("JobID|State|NodeList")
    for path in sorted((state_dir() / "jobs").glob("*.json")):
        job = json.loads(path.read_text())
        name = job.get("name", job["id"])
        if not wanted or name in wanted or job["id"] in wanted or name.split("_")[0] in wanted:
            print(f"{name}|{job.get('state', 'PENDING')}|127.0.0.1")
    return 0


# ---------------------------------------------------------------- srun


def srun_main(argv: List[str]) -> int:
    record("srun", argv)
    opts, cmd = parse_options(argv)
    if not cmd:
        sys.exit("srun: fatal: no command given")
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        sys.exit("srun: fatal: not inside a job allocation (the stand-in needs sbatch first)")
    nodes = int(opts.get("nodes") or os.environ.get("SLURM_JOB_NUM_NODES", "1"))
    if "ntasks_per_node" in opts:
        per_node = int(opts["ntasks_per_node"])
    elif "ntasks" in opts:
        per_node = int(opts["ntasks"]) // nodes
    else:
        per_node = int(os.environ.get("SLURM_NTASKS_PER_NODE", "1"))
    ntasks = nodes * per_node
    hosts = expand_hostlist(os.environ.get("SLURM_JOB_NODELIST", loopback_nodelist(nodes)))[:nodes]
    step = load_job(job_id).get("next_step", 0)
    job = load_job(job_id)
    job["next_step"] = step + 1
    save_job(job_id, job)

    procs: List[subprocess.Popen] = []
    pgids: List[int] = []
    files = []
    for node in range(nodes):
        pgid = 0  # the node's first task founds the node's process group
        for local in range(per_node):
            rank = node * per_node + local
            env = dict(os.environ)
            env.update({
                "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(local), "SLURM_NODEID": str(node),
                "SLURMD_NODENAME": hosts[node], "SLURM_STEP_ID": str(step), "SLURM_STEPID": str(step),
                "SLURM_NTASKS": str(ntasks), "SLURM_NPROCS": str(ntasks), "SLURM_STEP_NUM_TASKS": str(ntasks),
                "SLURM_STEP_NUM_NODES": str(nodes), "SLURM_STEP_NODELIST": loopback_nodelist(nodes),
                "SLURM_STEP_TASKS_PER_NODE": f"{per_node}(x{nodes})", "SLURM_NTASKS_PER_NODE": str(per_node),
            })
            pattern = dict(job_id=job_id, job_name=os.environ.get("SLURM_JOB_NAME", ""), task=rank,
                           node=node, nodename=hosts[node], step=str(step),
                           array_job=os.environ.get("SLURM_ARRAY_JOB_ID", ""),
                           array_task=os.environ.get("SLURM_ARRAY_TASK_ID", ""))
            stdout = stderr = None
            if "output" in opts:
                path = Path(expand_pattern(opts["output"], **pattern))
                path.parent.mkdir(parents=True, exist_ok=True)
                stdout = open(path, "a" if opts.get("open_mode") == "append" else "w")
                files.append(stdout)
                stderr = subprocess.STDOUT
            if "error" in opts:
                path = Path(expand_pattern(opts["error"], **pattern))
                path.parent.mkdir(parents=True, exist_ok=True)
                stderr = open(path, "a" if opts.get("open_mode") == "append" else "w")
                files.append(stderr)
            proc = subprocess.Popen(cmd, env=env, stdout=stdout, stderr=stderr, process_group=pgid)
            if local == 0:
                pgid = proc.pid
                pgids.append(pgid)
            procs.append(proc)
    steps = load_job(job_id)
    steps.setdefault("steps", {})[str(step)] = {"pgids": pgids, "running": True}
    save_job(job_id, steps)

    def forward(signum, frame):
        for pg in pgids:
            try:
                os.killpg(pg, signum)
            except ProcessLookupError:
                pass

    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, forward)

    kill_on_bad_exit = "kill_on_bad_exit" in opts and opts["kill_on_bad_exit"] != "0"
    killed_at: Optional[float] = None
    while any(p.poll() is None for p in procs):
        if kill_on_bad_exit and killed_at is None and any(p.returncode not in (None, 0) for p in procs):
            forward(signal.SIGTERM, None)
            killed_at = time.time()
        if killed_at is not None and time.time() - killed_at > 10:
            forward(signal.SIGKILL, None)
        time.sleep(0.05)
    for f in files:
        f.close()
    job = load_job(job_id)
    job["steps"][str(step)]["running"] = False
    job["steps"][str(step)]["rcs"] = [p.returncode for p in procs]
    save_job(job_id, job)
    codes = [p.returncode if p.returncode >= 0 else 128 - p.returncode for p in procs]
    return max(codes)


# ---------------------------------------------------------------- scontrol / scancel


def scontrol_main(argv: List[str]) -> int:
    record("scontrol", argv)
    if argv[:2] == ["show", "hostnames"] and len(argv) == 3:
        print("\n".join(expand_hostlist(argv[2])))
        return 0
    if len(argv) == 2 and argv[0] == "requeue":
        if not job_file(argv[1]).exists():
            print(f"scontrol: error: Invalid job id specified: {argv[1]}", file=sys.stderr)
            return 1
        (state_dir() / "jobs" / f"{argv[1]}.requeue").touch()
        return 0
    print(f"scontrol (fake): unsupported command {argv}", file=sys.stderr)
    return 1


def scancel_main(argv: List[str]) -> int:
    record("scancel", argv)
    signame: Optional[str] = None
    batch = full = False
    ids = []
    for arg in argv:
        if arg.startswith("--signal="):
            signame = arg.split("=", 1)[1]
        elif arg in ("-b", "--batch"):
            batch = True
        elif arg in ("-f", "--full"):
            full = True
        else:
            ids.append(arg)
    for job_id in ids:
        job = load_job(job_id)
        if not job:
            print(f"scancel: error: Invalid job id {job_id}", file=sys.stderr)
            return 1
        signum = getattr(signal, "SIG" + signame.upper().removeprefix("SIG")) if signame else signal.SIGTERM
        targets = []
        if not batch or full:
            targets += [pg for s in job.get("steps", {}).values() if s.get("running") for pg in s["pgids"]]
        if signame is None or batch or full:
            targets.append(job.get("batch_pgid"))
        if signame is None:
            job["state"] = "CANCELLED"
            save_job(job_id, job)
        for pg in targets:
            if pg:
                try:
                    os.killpg(pg, signum)
                except ProcessLookupError:
                    pass
    return 0


TOOLS = {"sbatch": sbatch_main, "srun": srun_main, "scontrol": scontrol_main, "scancel": scancel_main,
         "sacct": sacct_main}


def main() -> None:
    tool = Path(sys.argv[0]).name
    sys.exit(TOOLS[tool](sys.argv[1:]))
