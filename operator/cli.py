"""`kvops crds`, `kvops rbac`, `kvops manifests`, `kvops operator` and `kvops eval`. Imports
are lazy so that the worker's commands never pay for kopf or the Kubernetes client."""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path


def crds_command(args: argparse.Namespace) -> int:
    from kvops.operator.crd import crd_documents

    documents = crd_documents()
    if args.output_dir is None:
        sys.stdout.write("---\n".join(documents.values()))
        return 0
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    for name, text in documents.items():
        (output / name).write_text(text)
        print(output / name)
    return 0


def rbac_command(args: argparse.Namespace) -> int:
    import yaml

    from kvops.operator.rbac import documents

    sys.stdout.write(yaml.safe_dump_all(documents(args.namespace, args.all_namespaces)))
    return 0


def manifests_command(args: argparse.Namespace) -> int:
    import yaml

    from kvops.operator.rbac import install_documents

    documents = (
        install_documents(args.namespace, args.all_namespaces, args.image)
        if args.image
        else install_documents(args.namespace, args.all_namespaces)
    )
    sys.stdout.write(yaml.safe_dump_all(documents, sort_keys=False))
    return 0


def operator_command(args: argparse.Namespace) -> int:
    from kvops.operator.main import run

    namespaces = [] if args.all_namespaces else [args.namespace]
    # kopf freezes every operator when two peers share a priority: replicas draw their own.
    priority = args.priority if args.priority is not None else random.randint(1, 2**30)
    run(namespaces, args.liveness, args.metrics_port, priority, args.endpoint_template)
    return 0


def eval_command(args: argparse.Namespace) -> int:
    from kvops.operator.evaluation import eval_command as run

    return run(args)


def add_operator_commands(subparsers: argparse._SubParsersAction) -> None:
    crds = subparsers.add_parser("crds", help="print or write the CustomResourceDefinitions")
    crds.add_argument("--output-dir", default=None, help="write one file per CRD here")
    crds.set_defaults(handler=crds_command)

    rbac = subparsers.add_parser(
        "rbac", help="print the operator's ServiceAccount, Role and RoleBinding"
    )
    rbac.add_argument("--namespace", default="default", help="where the operator runs")
    rbac.add_argument(
        "--all-namespaces", action="store_true", help="a ClusterRole for a cluster-wide operator"
    )
    rbac.set_defaults(handler=rbac_command)

    manifests = subparsers.add_parser(
        "manifests",
        help="print the operator's ServiceAccount, roles and Deployment (apply after `kvops crds`)",
    )
    manifests.add_argument("--namespace", default="default", help="where the operator runs")
    manifests.add_argument(
        "--all-namespaces", action="store_true", help="watch every namespace (a ClusterRole)"
    )
    # No default here: building the parser must not import the API models (pydantic), which
    # every `kvops` start would pay for, the model-pull init container included.
    manifests.add_argument(
        "--image", default=None, help="the operator image (default: this release's)"
    )
    manifests.set_defaults(handler=manifests_command)

    operator = subparsers.add_parser("operator", help="run the Kubernetes operator")
    scope = operator.add_mutually_exclusive_group()
    scope.add_argument("--namespace", default="default", help="watch this namespace")
    scope.add_argument("--all-namespaces", action="store_true", help="watch every namespace")
    operator.add_argument(
        "--liveness", default=None, help="serve liveness here, e.g. http://0.0.0.0:8080/healthz"
    )
    operator.add_argument("--metrics-port", type=int, default=None, help="Prometheus metrics port")
    operator.add_argument(
        "--priority",
        type=int,
        default=None,
        help="peering priority: the highest running operator works, the others wait (random)",
    )
    operator.add_argument(
        "--endpoint-template",
        default="http://{name}.{namespace}.svc:8000",
        help="how the operator reaches an LLMDeployment's HTTP API (for prompt evaluations)",
    )
    operator.set_defaults(handler=operator_command)

    evaluate = subparsers.add_parser(
        "eval",
        help="run a PromptVersion's evaluation dataset against an OpenAI-compatible endpoint",
    )
    evaluate.add_argument("promptversion", help="the PromptVersion manifest (YAML or JSON)")
    evaluate.add_argument(
        "--endpoint", required=True, help="the endpoint's base URL, e.g. http://chat.team.svc:8000"
    )
    evaluate.add_argument(
        "--model", default=None, help="the model name to send (default: evaluation.llmDeployment)"
    )
    evaluate.add_argument("--report", default=None, help="write the JSON report to this file")
    evaluate.add_argument(
        "--termination-log",
        default=None,
        help="write a JSON summary (under 4 KiB) here: the operator's Job reads it back",
    )
    evaluate.add_argument(
        "--timeout", type=float, default=120.0, help="seconds each request may take"
    )
    evaluate.set_defaults(handler=eval_command)
