"""The `workbench` command.

    workbench serve [--home DIR] [--host 127.0.0.1] [--port N] [--detach]   run the local backend
                    [--deployment-engine builtin|vllm]                    default engine of deployments
    workbench status [--home DIR]                                           what runs
    workbench stop [--home DIR]                                             stop it and everything it started
    workbench promote --job-id J --output-model-id M --base-model B [--checkpoint-name C]
    workbench demo [--home DIR] [--steps N]                                 the main demo on the embedded model

DIR defaults to $WORKBENCH_HOME, else ~/.workbench.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _home(args):
    from workbench.backend.home import resolve_home

    return resolve_home(args.home)


def cmd_serve(args) -> int:
    from workbench.backend import server

    home = _home(args)
    if args.deployment_engine:   # read by the control plane (deployment/engines.py); children inherit it
        os.environ["WORKBENCH_DEPLOYMENT_ENGINE"] = args.deployment_engine
    if args.detach:
        info = server.start_detached(home, args.host, args.port)
        print(f"workbench backend serving at {info['base_url']} (pid {info['pid']}, home {home})")
        return 0
    server.serve_foreground(home, args.host, args.port, log_level=args.log_level)
    return 0


def cmd_stop(args) -> int:
    from workbench.backend import server

    home = _home(args)
    print("stopped" if server.stop(home) else f"no workbench backend was running for {home}")
    return 0


def cmd_status(args) -> int:
    import httpx

    from workbench.backend import server
    from workbench.backend.home import ACCOUNT_ID, read_api_key

    home = _home(args)
    info = server.running_server(home)
    if not info:
        print(f"no workbench backend is running for {home}")
        return 1
    headers = {"X-Api-Key": read_api_key(home)}
    base = info["base_url"]
    jobs = httpx.get(f"{base}/v1/accounts/{ACCOUNT_ID}/rlorTrainerJobs", headers=headers).json()["rlorTrainerJobs"]
    deps = httpx.get(f"{base}/v1/accounts/{ACCOUNT_ID}/deployments", headers=headers).json()["deployments"]
    if args.json:
        print(json.dumps({"server": info, "jobs": jobs, "deployments": deps}, indent=2))
        return 0
    print(f"backend   {base}  pid {info['pid']}  home {home}")
    for job in jobs:
        print(f"trainer   {job['name'].split('/')[-1]:40s} {job['state']:22s} {job['trainingConfig']['baseModel']}")
    for dep in deps:
        print(f"deploy    {dep['name'].split('/')[-1]:40s} {dep['state']:22s} {dep['baseModel']}")
    return 0


def cmd_promote(args) -> int:
    from workbench.recipes.promote import promote_from_job

    model = promote_from_job(args.job_id, args.output_model_id, args.base_model, args.checkpoint_name)
    print(json.dumps(model, indent=2))
    return 0


def cmd_demo(args) -> int:
    from workbench.demo import run_demo

    run_demo(home=args.home, steps=args.steps)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="workbench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the local backend (control plane)")
    p.add_argument("--home", help="state directory (default $WORKBENCH_HOME or ~/.workbench)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=0, help="port (0 picks a free one)")
    p.add_argument("--detach", action="store_true", help="start in the background and return once ready")
    p.add_argument("--log-level", default="warning")
    p.add_argument("--deployment-engine", choices=["builtin", "vllm"], default=None,
                   help="engine of deployments whose shape does not choose one (default builtin, or "
                        "$WORKBENCH_DEPLOYMENT_ENGINE); vllm needs scripts/install_vllm.sh")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("stop", help="stop the backend and every process it started")
    p.add_argument("--home")
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("status", help="show what runs")
    p.add_argument("--home")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("promote", help="promote a trainer job's checkpoint to a model")
    p.add_argument("--job-id", required=True)
    p.add_argument("--output-model-id", required=True)
    p.add_argument("--base-model", required=True)
    p.add_argument("--checkpoint-name", help="exact row id, or its name without the session suffix "
                                              "(default: the newest promotable row)")
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("demo", help="train, sync, sample and promote on the embedded model")
    p.add_argument("--home")
    p.add_argument("--steps", type=int, default=30)
    p.set_defaults(func=cmd_demo)

    args = parser.parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
