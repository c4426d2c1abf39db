"""TLS and mutual TLS on the gRPC transport, with certificates made by openssl for 127.0.0.1: trusted, signed by
another CA, expired; and the loud warning of a node listening off loopback without TLS."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from edgellm.deploy.local_deployment import free_port
from edgellm.model.stage import stage_specs
from edgellm.net.messages import ForwardRequest
from edgellm.net.rpc import ChannelConfig, NodeUnreachable, RemoteHop, TlsFiles, serve
from edgellm.split.host import StageHost
from edgellm.split.one_process import load_stages
from edgellm.split.server import StageServer

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=edgellm-test-ca", cwd=d)  # fmt: skip
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}", cwd=d)  # fmt: skip
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", "-extfile", "san.cnf", cwd=d)  # fmt: skip
    # another CA (an attacker's, or a deployment's own that this one does not trust) and a client it signed
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "evil-ca.key", "-out", "evil-ca.pem",
            "-days", "2", "-subj", "/CN=not-the-deployment-ca", cwd=d)  # fmt: skip
    openssl("x509", "-req", "-in", "client.csr", "-CA", "evil-ca.pem", "-CAkey", "evil-ca.key", "-CAcreateserial",
            "-out", "evil-client.pem", "-days", "2", "-extfile", "san.cnf", cwd=d)  # fmt: skip
    # a server certificate of the right CA that expired in 2020 (`openssl ca` sets the dates; x509 -req cannot)
    (d / "ca.cnf").write_text("[ca]\ndefault_ca = d\n[d]\ndir = .\ndatabase = index.txt\nnew_certs_dir = .\n"
                              "serial = serial\ndefault_md = sha256\npolicy = p\n[p]\ncommonName = supplied\n")  # fmt: skip
    (d / "index.txt").write_text("")
    (d / "serial").write_text("1000\n")
    openssl("ca", "-batch", "-config", "ca.cnf", "-cert", "ca.pem", "-keyfile", "ca.key", "-in", "server.csr",
            "-out", "expired.pem", "-startdate", "20200101000000Z", "-enddate", "20200102000000Z",
            "-extfile", "san.cnf", cwd=d)  # fmt: skip
    return d


def start(certs: Path, model_dir: Path, client_auth: bool, cert: str = "server.pem"):
    (stage,) = load_stages(model_dir, [stage_specs(4, [2], "device")[1]])
    tls = TlsFiles(cert=certs / cert, key=certs / "server.key", ca=certs / "ca.pem", client_auth=client_auth)
    address = f"127.0.0.1:{free_port()}"
    server, _ = serve(StageServer("edge1", StageHost(stage)), address, ChannelConfig(token="t", tls=tls))
    return server, address


def call(address: str, tls: TlsFiles | None) -> torch.Tensor:
    hop = RemoteHop("edge1", address, ChannelConfig(token="t", deadline_s=5, tls=tls))
    try:
        req = ForwardRequest("s", torch.randn(1, 2, 32), torch.tensor([[0, 1]]), new_session=True)
        return hop.forward(req).output
    finally:
        hop.shutdown()


def test_tls_server_serves_clients_that_trust_its_ca_and_refuses_plaintext(certs, tiny_llama_dir):
    server, address = start(certs, tiny_llama_dir, client_auth=False)
    try:
        assert call(address, TlsFiles(ca=certs / "ca.pem")).shape == (1, 2, 32)
        with pytest.raises(NodeUnreachable):
            call(address, None)
    finally:
        server.stop(0)


def test_mutual_tls_requires_a_client_certificate(certs, tiny_llama_dir):
    server, address = start(certs, tiny_llama_dir, client_auth=True)
    try:
        mutual = TlsFiles(cert=certs / "client.pem", key=certs / "client.key", ca=certs / "ca.pem", client_auth=True)
        assert call(address, mutual).shape == (1, 2, 32)
        with pytest.raises(NodeUnreachable):
            call(address, TlsFiles(ca=certs / "ca.pem"))
    finally:
        server.stop(0)


def test_mutual_tls_refuses_a_client_certificate_of_another_ca(certs, tiny_llama_dir):
    server, address = start(certs, tiny_llama_dir, client_auth=True)
    try:
        forged = TlsFiles(cert=certs / "evil-client.pem", key=certs / "client.key", ca=certs / "ca.pem",
                          client_auth=True)  # fmt: skip
        with pytest.raises(NodeUnreachable):
            call(address, forged)
        with pytest.raises(NodeUnreachable):  # nor does a client that trusts another CA accept the server
            call(address, TlsFiles(cert=certs / "client.pem", key=certs / "client.key", ca=certs / "evil-ca.pem",
                                   client_auth=True))  # fmt: skip
    finally:
        server.stop(0)


def test_an_expired_server_certificate_is_refused(certs, tiny_llama_dir):
    server, address = start(certs, tiny_llama_dir, client_auth=False, cert="expired.pem")
    try:
        with pytest.raises(NodeUnreachable):
            call(address, TlsFiles(ca=certs / "ca.pem"))
    finally:
        server.stop(0)


def test_listening_off_loopback_without_tls_warns_loudly(tiny_llama_dir, caplog):
    (stage,) = load_stages(tiny_llama_dir, [stage_specs(4, [2], "device")[1]])
    with caplog.at_level("WARNING", logger="edgellm.net.rpc"):
        server, _ = serve(StageServer("edge1", StageHost(stage)), f"127.0.0.1:{free_port()}", ChannelConfig(token="t"))
        server.stop(0)
        assert "without TLS" not in caplog.text
        server, _ = serve(StageServer("edge1", StageHost(stage)), f"0.0.0.0:{free_port()}", ChannelConfig(token="t"))
        server.stop(0)
    assert "listening on 0.0.0.0" in caplog.text and "without TLS" in caplog.text
    assert "'t'" not in caplog.text and "token=t" not in caplog.text  # the secret itself is never logged
