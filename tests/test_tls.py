"""Mutual TLS: certificates made offline, a TLS federation that trains, and refusals that read as sentences."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from cryptography import x509

from patchsvdd import federated as fed
from patchsvdd.data.synth import generate_category
from patchsvdd.federated.local import Processes, project_root, with_this_environment
from patchsvdd.federated.openfl.local import start_federation
from patchsvdd.models.patchsvdd.network import PatchSVDD
from patchsvdd.system.certs import create_federation_certs, issued_by
from patchsvdd.system.probes import free_port

REPO = project_root()


def test_certificates_name_each_node_and_chain_to_the_root(tmp_path: Path) -> None:
    out = create_federation_certs(tmp_path / "pki", ["localhost", "director.example"], ["site_a"], ["frontend"])
    for stem in ("director", "site_a", "frontend"):
        assert issued_by(out / f"{stem}.crt", out / "root_ca.crt")
        assert (out / f"{stem}.key").stat().st_mode & 0o077 == 0  # private keys readable by the owner only
    director = x509.load_pem_x509_certificate((out / "director.crt").read_bytes())
    names = director.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "director.example"} <= set(names.get_values_for_type(x509.DNSName))
    assert "127.0.0.1" in {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}
    envoy = x509.load_pem_x509_certificate((out / "site_a.crt").read_bytes())
    assert envoy.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value == "site_a"
    other = create_federation_certs(tmp_path / "other", ["localhost"], ["site_a"])
    assert not issued_by(other / "site_a.crt", out / "root_ca.crt")


@pytest.fixture(scope="module")
def tls_federation(tmp_path_factory: pytest.TempPathFactory):
    data = tmp_path_factory.mktemp("tlsdata")
    generate_category(data, "fabric", seed=5, n_train=4, n_test_good=2, n_test_per_defect=1, image_size=256)
    run_dir = tmp_path_factory.mktemp("tlsrun")
    with Processes() as processes:
        nodes = start_federation(run_dir, data, "fabric", n_envoys=2, processes=processes, timeout=120, tls=True)
        yield nodes, run_dir, data


@pytest.mark.slow
def test_tls_federation_completes_an_experiment(tls_federation, tmp_path: Path) -> None:
    nodes, _, _ = tls_federation
    client = fed.connect(nodes.host, nodes.port, **{k: v for k, v in nodes.tls.items()})
    assert {r["envoy"] for r in fed.wait_for_envoys(client, 2, timeout=30)} == {"envoy_1", "envoy_2"}
    settings = fed.ExperimentSettings(
        rounds=1, repeat=1, max_steps=1, batch_size=4, idle_timeout=300, aggregator_port=free_port()
    )
    torch.manual_seed(0)
    experiment = fed.start_experiment(client, PatchSVDD(emb_dim=16), settings, "tls-run", tmp_path / "nb")
    log = fed.follow_metrics(experiment, idle_timeout=settings.idle_timeout)
    assert set(log.final("train")) == {"envoy_1", "envoy_2", "aggregator"}


@pytest.mark.slow
def test_client_without_tls_is_refused_with_a_sentence(tls_federation) -> None:
    nodes, _, _ = tls_federation
    with pytest.raises(fed.FederationError, match="requires TLS"):
        fed.connect(nodes.host, nodes.port, tls=False)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["foreign certificate", "foreign authority"])
def test_envoy_from_another_authority_is_refused(tls_federation, tmp_path: Path, case: str) -> None:
    nodes, run_dir, data = tls_federation
    foreign = create_federation_certs(tmp_path / "foreign", ["localhost"], ["envoy_x"])
    if case == "foreign certificate":  # trusts the federation's root, but its own certificate is foreign
        (foreign / "root_ca.crt").write_bytes((run_dir / "certs" / "root_ca.crt").read_bytes())
        expected = "refused this node's certificate"
    else:  # everything from another authority: the director is not trusted either
        expected = "is not trusted"
    config = tmp_path / "x.yaml"
    config.write_text(
        "params: {cuda_devices: []}\nshard_descriptor:\n  template: mvtec_shard_descriptor.MVTecShardDescriptor\n"
        f"  params: {{data_folder: {data}, category: fabric, rank_worldsize: '1,2'}}\n"
    )
    result = subprocess.run(
        [
            str(REPO / "envoy_folder" / "start_envoy.sh"),
            "envoy_x",
            str(config),
            nodes.host,
            str(nodes.port),
            str(foreign),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATCHSVDD_WORKDIR": str(tmp_path / "w"), "PATH": with_this_environment("/usr/bin:/bin")},
    )
    assert result.returncode == 2
    assert expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert "envoy_x" not in (run_dir / "logs" / "director.log").read_text()  # never registered


def test_unreachable_director_is_reported_at_once(tmp_path: Path) -> None:

    with pytest.raises(fed.FederationError, match="cannot reach the director"):
        fed.connect("localhost", free_port(), tls=False)
