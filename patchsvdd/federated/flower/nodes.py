"""Starting Flower's processes as a site and the director run them (what the start scripts call).

``superlink``: ``flower-superlink --isolation process`` (it runs no app: ``driver.py`` plays the ServerApp in
the data scientist's process), runtime dependency installation off, with a SuperExec secret made once in its
working folder (``superexec.secret``: what the data scientist needs to take the run's ServerApp task). With a
certificate folder (``patchsvdd certs``) it serves TLS with ``director.crt`` and admits only SuperNodes whose
keys (``<site>.auth.pub`` there) it registers at start (``--enable-supernode-auth``); without one it serves
plain HTTP on loopback only.

``supernode``: ``flower-supernode --isolation process`` (its fixed waits cut: ``supernode.py``) with the
site's name and shard config as its node config, its runtime API on a free loopback port, and ``site.serve``
in this process, which runs the project's app and refuses any other. With a certificate folder the SuperNode
checks the SuperLink's certificate against ``root_ca.crt`` and signs in with ``<site>.auth``. When the
SuperNode exits (a refused key, a SuperLink gone), this process says why in one line and exits too."""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from patchsvdd.system.probes import free_port, listens

LOOPBACK = ("127.0.0.1", "localhost", "::1")
SECRET_FILE = "superexec.secret"
ACTIVATED = "SuperNode ID:"  # what the SuperNode logs once the SuperLink has admitted it
CLIENT_CERTIFICATE = "PATCHSVDD_FLOWER_CLIENT_CERTIFICATE"  # CERT:KEY the SuperNode shows the SuperLink (mtls.py)
NOT_ADMITTED = "Failed to activate SuperNode"  # what it logs when it gives up (a key refused, or no SuperLink)


def flower_command(name: str) -> str:
    """The path of Flower's command ``name`` in this interpreter's environment."""
    return str(Path(sys.executable).with_name(name))


def secret_file(workdir: Path) -> Path:
    """The SuperLink's SuperExec secret in ``workdir`` (32 random bytes, made on first use, owner-only)."""
    path = Path(workdir) / SECRET_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(secrets.token_bytes(32))
    return path


def wait_listening(host: str, port: int, process: subprocess.Popen, timeout: float, what: str, log: Path) -> None:
    """Return once ``host:port`` accepts connections; SystemExit naming ``what`` and its log otherwise."""
    deadline = time.monotonic() + timeout
    while not listens(host, port, timeout=0.5):
        if process.poll() is not None:
            raise SystemExit(f"{what} exited (code {process.returncode}): {last_lines(log)}")
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} did not listen on {host}:{port} in {timeout:.0f} s (log {log})")
        time.sleep(0.1)


def last_lines(log: Path, count: int = 6) -> str:
    try:
        return " | ".join(line.strip() for line in log.read_text(errors="replace").splitlines()[-count:])
    except FileNotFoundError:
        return "(no log)"


def register_keys(address: str, keys: list[Path], home: Path, certs: Path | None) -> None:
    """Register each SuperNode public key with the SuperLink at ``address`` (``flwr supernode register``; with
    ``certs``, over mutual TLS as the director)."""
    from patchsvdd.federated.flower.driver import SuperLink

    link = SuperLink(
        address,
        Path(os.devnull),
        root_certificates=None if certs is None else certs / "root_ca.crt",
        insecure=certs is None,
        client_certificate=None if certs is None else (certs / "director.crt", certs / "director.key"),
    )
    env = {**os.environ, "FLWR_HOME": str(link.cli_config(home))}
    for key in keys:
        done = subprocess.run(
            [*link.flwr(), "supernode", "register", str(key), "patchsvdd", "--format", "json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if '"success": true' not in done.stdout:
            raise SystemExit(
                f"could not register {key} with the SuperLink: {(done.stdout + done.stderr).strip()[-400:]}"
            )
        print(f"superlink: registered {key.name}", flush=True)


def superlink(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    secret = secret_file(workdir)
    command = [
        "--isolation",
        "process",
        "--disable-runtime-dependency-installation",
        "--superexec-auth-secret-file",
        str(secret),
        "--host",
        args.host,
        "--port",
        str(args.port),
    ]
    certs = Path(args.certs).resolve() if args.certs else None
    keys: list[Path] = []
    if certs is None:
        if args.host not in LOOPBACK:
            raise SystemExit(f"without certificates the SuperLink serves loopback only, not {args.host}: give CERT_DIR")
        command = [flower_command("flower-superlink"), *command, "--insecure"]
    else:
        mutual = [sys.executable, "-m", "patchsvdd.federated.flower.mtls", "superlink", str(certs / "root_ca.crt")]
        command = [*mutual, "--", *command]  # flower-superlink asking every client for a certificate (mtls.py)
        command += [
            "--ssl-ca-certfile",
            str(certs / "root_ca.crt"),
            "--ssl-certfile",
            str(certs / "director.crt"),
            "--ssl-keyfile",
            str(certs / "director.key"),
            "--enable-supernode-auth",
        ]
        keys = sorted(certs.glob("*.auth.pub"))
    log = workdir / "superlink.log"
    with open(log, "ab") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=workdir)
    stop_with(process)
    address = f"{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
    wait_listening(address.rsplit(":", 1)[0], args.port, process, 60, "the SuperLink", log)
    register_keys(address, keys, workdir / "flwr_home", certs)
    print(f"superlink: ready on {args.host}:{args.port}; SuperExec secret {secret}; log {log}", flush=True)
    return process.wait()


def stop_with(process: subprocess.Popen) -> None:
    """Stop ``process`` when this process is told to stop (SIGTERM, SIGINT) and exit."""

    def handler(signum: int, frame: object) -> None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def supernode(args: argparse.Namespace) -> int:
    from patchsvdd.federated.flower import site as site_module
    from patchsvdd.system.configs import ConfigError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per poll otherwise

    config = Path(args.config).resolve()
    try:
        site = site_module.Site(args.name, config)
        _ = site.data  # bad data stop the site here, with the reader's error, before it connects
    except ConfigError as exc:
        print(f"site {args.name}: {exc}", file=sys.stderr)
        return 2
    site_module.register(site)
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    runtime = free_port()
    node_config = f'{site_module.NAME_KEY}="{args.name}" {site_module.CONFIG_KEY}="{config}"'
    command = [
        sys.executable,
        "-m",
        "patchsvdd.federated.flower.supernode",  # flower-supernode, its fixed waits cut (supernode.py)
        "--superlink",
        args.superlink,
        "--isolation",
        "process",
        "--host",
        "127.0.0.1",
        "--port",
        str(runtime),
        "--node-config",
        node_config,
        "--max-wait-time",
        str(args.link_timeout),
    ]
    env = dict(os.environ)
    certs = Path(args.certs).resolve() if args.certs else None
    shown = None if certs is None else (certs / f"{args.name}.crt", certs / f"{args.name}.key")
    if shown is not None and not all(path.is_file() for path in shown):
        print(
            f"site {args.name}: no certificate {shown[0].name} with its key in {certs}: the SuperLink takes only "
            "sites that show a certificate of the federation's authority (patchsvdd certs --envoy NAME)",
            file=sys.stderr,
        )
        return 2
    if certs is not None and shown is not None:
        command += ["--root-certificates", str(certs / "root_ca.crt")]
        command += ["--auth-supernode-private-key", str(certs / f"{args.name}.auth")]
        env[CLIENT_CERTIFICATE] = f"{shown[0]}{os.pathsep}{shown[1]}"
    else:
        command.append("--insecure")
    log = workdir / "supernode.log"
    with open(log, "ab") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=workdir, env=env)
    stop_with(process)
    wait_listening("127.0.0.1", runtime, process, 60, "the SuperNode", log)
    stop = threading.Event()
    server = threading.Thread(target=site_module.serve, args=(f"127.0.0.1:{runtime}", args.name), kwargs={"stop": stop})
    server.daemon = True
    server.start()
    while ACTIVATED not in log.read_text(errors="replace") and process.poll() is None:
        time.sleep(0.1)  # the SuperNode says when the SuperLink has admitted it; process.wait() ends on a refusal
    if process.poll() is None:
        print(f"site {args.name}: ready, app {site_module.app_hash()[:12]}; SuperNode log {log}", flush=True)
    code = process.wait()
    stop.set()
    text = log.read_text(errors="replace")
    host, _, port = args.superlink.rpartition(":")
    reachable = listens(host.strip("[]"), int(port))
    if reachable and certs is not None and shown is not None:
        from patchsvdd.federated.flower.mtls import answers

        if not answers(args.superlink, certs / "root_ca.crt", *shown):
            print(
                f"site {args.name}: the SuperLink at {args.superlink} refused this site's certificate "
                f"{shown[0].name}: it takes only certificates of the federation's authority (mutual TLS; the "
                "director's root_ca.crt, patchsvdd certs)",
                file=sys.stderr,
            )
            return 4
    if NOT_ADMITTED in text and reachable:
        print(
            f"site {args.name}: the SuperLink at {args.superlink} did not admit this site: its key "
            f"{args.name}.auth.pub is not registered there (the director registers the sites' keys: "
            "director_folder/start_superlink.sh with them in CERT_DIR)",
            file=sys.stderr,
        )
        return 3
    print(f"site {args.name}: the SuperNode exited (code {code}): {last_lines(log)}", file=sys.stderr)
    return code or 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m patchsvdd.federated.flower.nodes", description=__doc__.split("\n")[0]
    )
    roles = parser.add_subparsers(dest="role", required=True)
    link = roles.add_parser("superlink", help="the director's role")
    link.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all; needs --certs)")
    link.add_argument("--port", type=int, default=9093, help="the SuperLink's one port (Fleet, Control, Runtime)")
    link.add_argument("--certs", default=None, help="certificate folder of patchsvdd certs (TLS, SuperNode keys)")
    link.add_argument("--workdir", default=".", help="working folder: log, SuperExec secret")
    link.set_defaults(run=superlink)
    node = roles.add_parser("supernode", help="a site's role")
    node.add_argument("--name", required=True, help="this site's name")
    node.add_argument("--config", required=True, help="this site's shard config (the envoy's YAML)")
    node.add_argument("--superlink", default="127.0.0.1:9093", help="the SuperLink, HOST:PORT")
    node.add_argument("--certs", default=None, help="folder with root_ca.crt and NAME.auth (patchsvdd certs)")
    node.add_argument("--workdir", default=".", help="working folder: the SuperNode's log")
    node.add_argument("--link-timeout", type=float, default=600, help="seconds to keep trying to reach the SuperLink")
    node.set_defaults(run=supernode)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
