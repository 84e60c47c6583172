"""The `workbench` command.

    workbench serve [--home DIR] [--host 127.0.0.1] [--port N] [--detach]   run the local backend
                    [--deployment-engine builtin|vllm]                    default engine of deployments
                    [--compression-format F]                              default delta format of trainer jobs
    workbench status [--home DIR] [--json]                                  the backend, its jobs and deployments
    workbench ls [--home DIR] [--all] [--json]                              trainer jobs and deployments
    workbench rm ID [ID ...] | --all [--home DIR]                           delete jobs / deployments (stops them)
    workbench stop [--home DIR]                                             stop it and everything it started
    workbench promote --job-id J --output-model-id M --base-model B [--checkpoint-name C] [--home DIR]
    workbench demo [--home DIR] [--steps N]                                 the main demo on the embedded model

DIR defaults to $WORKBENCH_HOME, else ~/.workbench. An expected failure (a bad id, a checkpoint that cannot
be promoted, no backend running) prints one line `error: ...` and exits 1; `--debug` (on any command) shows
the traceback instead. Ctrl-C exits 130 without a traceback; a closed pipe (`workbench status --json | head`)
ends quietly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


class CliError(Exception):
    """An expected failure: its message is the one line the user sees."""


def _home(args):
    from workbench.backend.home import resolve_home

    return resolve_home(args.home)


def _running(args):
    """(home, base_url, headers) of the running backend, or CliError saying how to start one."""
    from workbench.backend import server
    from workbench.backend.home import read_api_key

    home = _home(args)
    info = server.running_server(home)
    if not info:
        raise CliError(f"no workbench backend is running for {home} (start one: workbench serve --detach "
                       f"--home {home})")
    return home, info, {"X-Api-Key": read_api_key(home) or ""}


def _get(base: str, path: str, headers: dict) -> dict:
    import httpx

    r = httpx.get(base + path, headers=headers, timeout=30)
    r.raise_for_status()
    return r.json()


def _listing(info: dict, headers: dict, show_deleted: bool = False) -> tuple[list[dict], list[dict]]:
    from workbench.backend.home import ACCOUNT_ID

    base = info["base_url"]
    query = "pageSize=1000" + ("&showDeleted=true" if show_deleted else "")
    jobs = _get(base, f"/v1/accounts/{ACCOUNT_ID}/rlorTrainerJobs?{query}", headers).get("rlorTrainerJobs", [])
    deps = _get(base, f"/v1/accounts/{ACCOUNT_ID}/deployments?pageSize=1000", headers).get("deployments", [])
    return jobs, deps


def _short(name: str) -> str:
    return name.split("/")[-1]


# ---- commands --------------------------------------------------------------------------------------
def cmd_serve(args) -> int:
    from workbench.backend import server

    home = _home(args)
    if args.deployment_engine:   # read by the control plane (deployment/engines.py); children inherit it
        os.environ["WORKBENCH_DEPLOYMENT_ENGINE"] = args.deployment_engine
    if args.compression_format:
        from workbench.checkpoints.formats import DEFAULT_ENV, check_format

        try:
            check_format(args.compression_format, "--compression-format")
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        os.environ[DEFAULT_ENV] = args.compression_format   # read by the control plane; a detached one inherits it
    if args.detach:
        info = server.start_detached(home, args.host, args.port)
        print(f"workbench backend serving at {info['base_url']} (pid {info['pid']}, home {home})")
        return 0
    try:
        server.serve_foreground(home, args.host, args.port, log_level=args.log_level)
    except KeyboardInterrupt:
        print("\nworkbench backend stopped", file=sys.stderr)
        return 0
    return 0


def cmd_stop(args) -> int:
    from workbench.backend import server

    home = _home(args)
    print("stopped" if server.stop(home) else f"no workbench backend was running for {home}")
    return 0


def cmd_status(args) -> int:
    try:
        home, info, headers = _running(args)
    except CliError as e:
        print(str(e))
        return 1
    jobs, deps = _listing(info, headers)
    if args.json:
        print(json.dumps({"server": info, "jobs": jobs, "deployments": deps}, indent=2))
        return 0
    print(f"backend   {info['base_url']}  pid {info['pid']}  home {home}")
    for job in jobs:
        print(f"trainer   {_short(job['name']):40s} {job['state']:22s} {job['trainingConfig']['baseModel']}")
    for dep in deps:
        print(f"deploy    {_short(dep['name']):40s} {dep['state']:22s} {dep['baseModel']}")
    return 0


_GONE = ("JOB_STATE_DELETED", "DELETED", "DELETING", "JOB_STATE_DELETING")


def cmd_ls(args) -> int:
    home, info, headers = _running(args)
    jobs, deps = _listing(info, headers, show_deleted=args.all)
    if not args.all:
        jobs = [j for j in jobs if j.get("state") not in _GONE]
        deps = [d for d in deps if d.get("state") not in _GONE]
    rows = ([{"kind": "trainer", "id": _short(j["name"]), "state": j.get("state", "?").replace("JOB_STATE_", ""),
              "model": j.get("trainingConfig", {}).get("baseModel", ""), "created": j.get("createTime", ""),
              "linked": ""} for j in jobs]
            + [{"kind": "deployment", "id": _short(d["name"]), "state": d.get("state", "?"),
                "model": d.get("baseModel", ""), "created": d.get("createTime", ""),
                "linked": _short(d.get("hotLoadTrainerJob") or "")} for d in deps])
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no trainer jobs or deployments on {info['base_url']}"
              + ("" if args.all else " (deleted ones: workbench ls --all)"))
        return 0
    print(f"{'KIND':10s} {'ID':40s} {'STATE':10s} {'CREATED':20s} {'HOT-LOADS FROM':30s} MODEL")
    for r in rows:
        print(f"{r['kind']:10s} {r['id']:40s} {r['state']:10s} {r['created'][:19]:20s} {r['linked']:30s} {r['model']}")
    live = [r for r in rows if r["state"] not in ("DELETED", "FAILED", "CANCELLED", "PAUSED", "COMPLETED")]
    if live:
        print(f"\n{len(live)} running (each a process); remove: workbench rm ID ... or workbench rm --all")
    return 0


def cmd_rm(args) -> int:
    import httpx

    from workbench.backend.home import ACCOUNT_ID

    if not args.ids and not args.all:
        raise CliError("name what to delete: workbench rm ID [ID ...], or workbench rm --all")
    if args.ids and args.all:
        raise CliError("give IDs or --all, not both")
    home, info, headers = _running(args)
    jobs, deps = _listing(info, headers)
    live_jobs = {_short(j["name"]): j for j in jobs if j.get("state") not in _GONE}
    live_deps = {_short(d["name"]): d for d in deps if d.get("state") not in _GONE}
    if args.all:
        targets = [("deployment", d) for d in live_deps] + [("trainer", j) for j in live_jobs]
    else:
        targets = []
        for i in args.ids:
            kinds = [k for k, pool in (("deployment", live_deps), ("trainer", live_jobs)) if i in pool]
            if not kinds:
                known = ", ".join(sorted(live_jobs) + sorted(live_deps)) or "none"
                raise CliError(f"no trainer job or deployment {i!r} on {info['base_url']} (live ones: {known})")
            targets += [(k, i) for k in kinds]
    if not targets:
        print("nothing to delete")
        return 0
    base = info["base_url"]
    for kind, ident in targets:  # deployments first: they hot-load from the trainers
        path = "deployments" if kind == "deployment" else "rlorTrainerJobs"
        r = httpx.delete(f"{base}/v1/accounts/{ACCOUNT_ID}/{path}/{ident}", headers=headers, timeout=120)
        if r.status_code >= 400:
            raise CliError(f"could not delete {kind} {ident}: HTTP {r.status_code} {r.text[:200]}")
        print(f"deleted {kind} {ident}")
    return 0


def cmd_promote(args) -> int:
    from workbench.connect import Backend
    from workbench.recipes.promote import PromoteError, promote_from_job

    from fireworks.training.sdk import validate_output_model_id

    problems = validate_output_model_id(args.output_model_id)
    if problems:  # refused before any backend is looked for
        raise CliError(f"--output-model-id {args.output_model_id!r}: " + " ".join(problems))
    backend = None  # FIREWORKS_BASE_URL / FIREWORKS_API_KEY name a remote service
    if args.home or not os.environ.get("FIREWORKS_BASE_URL"):
        home, info, headers = _running(args)  # never starts a backend just to promote
        backend = Backend(info["base_url"], headers["X-Api-Key"], home)
    try:
        model = promote_from_job(args.job_id, args.output_model_id, args.base_model, args.checkpoint_name,
                                 backend=backend)
    except PromoteError as e:
        raise CliError(str(e)) from e
    print(json.dumps(model, indent=2))
    return 0


def cmd_demo(args) -> int:
    from workbench.demo import run_demo

    run_demo(home=args.home, steps=args.steps)
    return 0


# ---- errors ----------------------------------------------------------------------------------------
def _one_line(e: BaseException) -> str:
    """The message of an expected failure as one line, without the SDK's cloud-only hints."""
    from workbench.quiet import local_text

    text = local_text(str(e)) if str(e).strip() else type(e).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    first = lines[0] if lines else type(e).__name__
    import httpx

    if isinstance(e, httpx.ConnectError):
        return f"cannot reach the workbench backend ({first}); is it running? workbench status"
    return first[:400]


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", help="the backend's state directory (default $WORKBENCH_HOME, else ~/.workbench)")
    common.add_argument("--debug", action="store_true", help="show the full traceback of an error")

    parser = argparse.ArgumentParser(prog="workbench", description=__doc__.split("\n\n")[0],
                                     epilog="Tutorials: the notebooks/ folder (start with 01_quickstart.ipynb).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", parents=[common], help="run the local backend (control plane)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=0, help="port (default 0: pick a free one)")
    p.add_argument("--detach", action="store_true", help="start in the background and return once ready")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                   help="the control plane's log level (default warning)")
    p.add_argument("--deployment-engine", choices=["builtin", "vllm"], default=None,
                   help="engine of deployments whose shape does not choose one (default builtin, or "
                        "$WORKBENCH_DEPLOYMENT_ENGINE); vllm needs scripts/install_vllm.sh")
    p.add_argument("--compression-format", help="sampler-delta format of trainer jobs that do not choose one "
                   "(arc_v2 default, arc_v1, arc_v3, workbench_v1; see README 'Delta formats')")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("stop", parents=[common], help="stop the backend and every process it started")
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("status", parents=[common], help="show the backend, its trainer jobs and deployments")
    p.add_argument("--json", action="store_true", help="print JSON (server info, jobs, deployments)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("ls", parents=[common], help="list trainer jobs and deployments")
    p.add_argument("--all", action="store_true", help="include deleted ones")
    p.add_argument("--json", action="store_true", help="print JSON rows")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("rm", parents=[common], help="delete trainer jobs and/or deployments (stops their processes)")
    p.add_argument("ids", nargs="*", metavar="ID", help="trainer job or deployment ids (as `workbench ls` shows)")
    p.add_argument("--all", action="store_true", help="delete every live trainer job and deployment")
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("promote", parents=[common], help="promote a trainer job's checkpoint to a model")
    p.add_argument("--job-id", required=True, help="the trainer job whose checkpoint to promote")
    p.add_argument("--output-model-id", required=True, help="the new model's id: 1-63 of a-z, 0-9, '-'")
    p.add_argument("--base-model", required=True, help="the job's base model, e.g. accounts/workbench/models/qwen3-tiny")
    p.add_argument("--checkpoint-name", help="exact row id, or its name without the session suffix "
                                             "(default: the newest promotable row)")
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("demo", parents=[common], help="train, sync, sample and promote on the embedded model")
    p.add_argument("--steps", type=int, default=40, help="training steps (default 40; lr warm-up, then cosine decay)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.debug:
        import logging

        logging.getLogger("fireworks").setLevel(logging.ERROR)  # the SDK's retry chatter: one error line instead
    try:
        code = args.func(args) or 0
        sys.stdout.flush()  # inside the try: a closed pipe is reported here, not at interpreter exit
        return code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `workbench status --json | head`: the reader left; say nothing more (and let the interpreter's
        # final flush go to /dev/null instead of raising again)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except Exception as e:  # noqa: BLE001 - every failure is one line unless --debug
        if args.debug:
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
