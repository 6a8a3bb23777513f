"""Gateways behind Debian's nginx as the SNI balancer (issue 20): three ``twistd`` Gateway
processes behind nginx's ``stream`` module (``ssl_preread``, ``hash
$ssl_preread_server_name consistent``, PROXY v1 headers from 127.0.0.2), running the
configuration docs/scaling.md shows, read from there with only its ports changed.

The Gateways, sessions and checks are test_haproxy's :class:`Cluster` with nginx in
HAProxy's place: every session works, each whole on one Gateway, the sessions spread over
more than one, each Gateway's status names only its own; kill -9 one: its sessions work again
through another (nginx's passive failure handling, ``max_fails`` and ``proxy_next_upstream``),
the other sessions' running streams go on.
"""

from __future__ import annotations

import os
import re

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from tcptunnel.test._harness import ROOT, ChildProcess, wait_until
from tcptunnel.test.test_haproxy import Cluster, _program, accepts

NGINX = _program("nginx")
# Debian builds the stream module as a dynamic module of its own package.
STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"
SCALING_DOC = os.path.join(ROOT, "docs", "scaling.md")


def documented_config() -> str:
    """The nginx configuration in docs/scaling.md's nginx section (its first nginx block)."""
    with open(SCALING_DOC, encoding="utf-8") as f:
        text = f.read()
    section = text[text.index("\n## nginx"):]
    match = re.search(r"```nginx\n(.*?)```", section, re.S)
    assert match is not None, "no ```nginx block in docs/scaling.md's nginx section"
    return match.group(1)


def test_config(front: int, ports: list[int]) -> str:
    """The documented configuration with the test's ports: nginx on 127.0.0.1:front, the
    Gateways on ``ports`` (the documentation's 7001, 7002, 7003)."""
    config = documented_config()
    documented = [f"127.0.0.1:{7001 + i}" for i in range(len(ports))]
    for old in ["listen 443;", *documented]:
        assert config.count(old) == 1, f"docs/scaling.md's nginx config has no one {old!r}"
    config = config.replace("listen 443;", f"listen 127.0.0.1:{front};")
    for old, port in zip(documented, ports, strict=True):
        config = config.replace(old, f"127.0.0.1:{port}")
    assert len(re.findall(r"^\s*server 127\.0\.0\.1:", config, re.M)) == len(ports), config
    return config


class NginxCluster(Cluster):
    """test_haproxy's Gateways and sessions behind nginx instead of HAProxy."""

    async def start_balancer(self) -> None:
        """nginx in the foreground with the documented configuration (its error log, where
        it notes each refused connect to a Gateway, on stderr), as one process: a worker
        would outlive a SIGKILLed master and hold the output pipes open."""
        assert NGINX is not None
        path = os.path.join(self.folder, "nginx.conf")
        with open(path, "w", encoding="ascii") as f:
            f.write(test_config(self.front, self.ports))
        self.nginx = ChildProcess()
        reactor.spawnProcess(
            self.nginx, NGINX,
            [NGINX, "-p", self.folder, "-e", "stderr", "-c", path,
             "-g", f"daemon off; master_process off; pid {self.folder}/nginx.pid;"],
            env=dict(os.environ))
        self.test.addCleanup(self.nginx.kill)

        def listening() -> bool:
            if self.nginx.ended.called:
                raise AssertionError(f"nginx exited: {self.balancer_log()}")
            return accepts(self.front)

        await wait_until(listening, 30, "nginx to listen")

    def balancer_log(self) -> str:
        """nginx's output."""
        return self.nginx.output.decode(errors="replace")


class NginxStreamTests(TestCase):
    """Sessions sharded by SNI over three Gateway processes behind nginx."""

    if NGINX is None or not os.path.exists(STREAM_MODULE):
        skip = ("nginx or its stream module is not installed (Debian: apt-get install nginx "
                f"libnginx-mod-stream, for {STREAM_MODULE}; `make test` installs them when run "
                "as root): could not run the tests with nginx as the balancer")

    timeout = 90

    async def test_sharded_then_kill(self) -> None:
        """Nine sessions (a Proxy-Client and two Proxy-Servers each) all work through nginx,
        each whole on one Gateway, spread over more than one, every /status naming only its
        own sessions with the proxies' own addresses (PROXY v1 from nginx).  kill -9 the
        Gateway with the most: its sessions work again through the others within 35 s,
        each whole on one, and the other sessions' running streams are not cut."""
        cluster = NginxCluster(self, gateways=3, sessions=9)
        await cluster.start()
        owners = await cluster.sharded()
        self.assertGreater(sum(1 for sessions in owners.values() if sessions), 1, owners)
        killed_at = reactor.seconds()
        victim, alive = await cluster.kill_one()
        moved_in = reactor.seconds() - killed_at
        after = await cluster.owners(alive)
        self.assertEqual(sorted(s for i in alive for s in after[i]), cluster.session_ids,
                         f"{after}, moved in {moved_in:.1f} s")
        for i in alive:  # the sessions that were there are still there
            self.assertLessEqual(set(owners[i]), set(after[i]), (owners, after))
        # nginx found the dead Gateway by a refused connect, nothing else.
        self.assertIn("Connection refused) while connecting to upstream",
                      cluster.balancer_log())
        self.assertIn(f"127.0.0.1:{cluster.ports[victim]}", cluster.balancer_log())
