"""Keep an envoy alive across director restarts (standard library only; no OpenFL, no torch).

OpenFL 1.7.1's envoy does not survive its director: its health-check thread
dies on the first failed call and is never restarted, and a collaborator whose
aggregator (a part of the director process) has gone retries forever. So a
director that is restarted never sees its envoys again, and they hang.

``python -m patchsvdd.system.supervise --director HOST:PORT -- fx envoy start ...``
runs the envoy as a child and probes the director's port every second:

- director unreachable: wait for it, at most ``--director-timeout`` seconds
  (then stop the envoy and exit 3 with a sentence saying so);
- director reachable again after being away: restart the envoy, which then
  registers its shard with the new director;
- envoy exits by itself while the director is up: exit with its code.

SIGTERM, SIGINT and SIGHUP stop the envoy first. A director restart is seen as
long as it is away for more than one probe (a restart takes seconds).
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from patchsvdd.system.probes import listens

DIRECTOR_GONE_EXIT = 3


def _die_with_parent() -> None:  # runs in the child before exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: no orphaned envoy
    except OSError:
        pass


@dataclass
class Supervisor:
    """Runs ``command`` and restarts it when the director at ``host:port`` comes back after being away."""

    command: Sequence[str]
    host: str
    port: int
    director_timeout: float = 600.0
    poll: float = 1.0
    grace: float = 10.0
    probe: Callable[[str, int], bool] = listens
    say: Callable[[str], None] = lambda line: print(f"[supervise] {line}", file=sys.stderr, flush=True)

    def __post_init__(self) -> None:
        self.child: subprocess.Popen | None = None
        self.restarts = 0

    def _start(self) -> subprocess.Popen:
        self.child = subprocess.Popen(list(self.command), preexec_fn=_die_with_parent)
        return self.child

    def stop_child(self) -> None:
        """SIGTERM the envoy, SIGKILL it after ``grace`` seconds."""
        if self.child is None or self.child.poll() is not None:
            return
        self.child.terminate()
        try:
            self.child.wait(timeout=self.grace)
        except subprocess.TimeoutExpired:
            self.child.kill()
            self.child.wait(timeout=10)

    def _wait_for_director(self) -> bool:
        """Poll until the director listens again; False after ``director_timeout`` seconds."""
        self.say(
            f"the director at {self.host}:{self.port} is unreachable; waiting up to "
            f"{self.director_timeout:.0f} s for it to come back"
        )
        deadline = time.monotonic() + self.director_timeout
        while time.monotonic() < deadline:
            time.sleep(self.poll)
            if self.probe(self.host, self.port):
                return True
        return False

    def run(self) -> int:
        """Supervise until the envoy exits on its own or the director stays away too long; the exit code."""
        child = self._start()
        while True:
            time.sleep(self.poll)
            code = child.poll()
            if self.probe(self.host, self.port):
                if code is not None:
                    return code
                continue
            # The director is away: the envoy in this process can no longer take part.
            if not self._wait_for_director():
                self.stop_child()
                self.say(
                    f"the director at {self.host}:{self.port} did not come back within "
                    f"{self.director_timeout:.0f} s: stopping this envoy "
                    "(set PATCHSVDD_DIRECTOR_TIMEOUT to wait longer)"
                )
                return DIRECTOR_GONE_EXIT
            self.stop_child()
            self.restarts += 1
            self.say(
                f"the director at {self.host}:{self.port} is back: restarting the envoy so that it registers "
                f"again (restart {self.restarts})"
            )
            child = self._start()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m patchsvdd.system.supervise", description=__doc__.splitlines()[0])
    parser.add_argument("--director", required=True, help="HOST:PORT of the director")
    parser.add_argument(
        "--director-timeout",
        type=float,
        default=600.0,
        help="seconds to wait for a director that went away before giving up",
    )
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between two probes of the director")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the envoy command")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    host, _, port = args.director.rpartition(":")
    if not command or not host or not port.isdigit():
        parser.error("expected --director HOST:PORT -- COMMAND ...")
    supervisor = Supervisor(command, host, int(port), args.director_timeout, args.poll)

    def stop(signum, _frame) -> None:
        supervisor.stop_child()
        sys.exit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
