"""The Ray executor gives byte-identical output to the local executor (a local Ray, 2 CPUs)."""

from __future__ import annotations

import pytest

from tests.test_curate_pipeline import make_corpus, read_output, recipe

ray = pytest.importorskip("ray")


def test_ray_equals_local(tmp_path):
    from lmfab.data.curate import curate

    root = tmp_path / "corpus"
    make_corpus(root)
    local = tmp_path / "local"
    curate(recipe([str(root)], local), workers=2, progress=False)
    started = False
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 ignore_reinit_error=True, _system_config={"worker_register_timeout_seconds": 60})
        started = True
        on_ray = tmp_path / "ray"
        stats = curate(recipe([str(root)], on_ray), executor="ray", progress=False)
        assert stats["executor"]["kind"] == "ray"
    finally:
        if started:
            ray.shutdown()
    assert read_output(on_ray) == read_output(local)
    assert (on_ray / "near_dedup" / "clusters.jsonl").read_bytes() == (
        local / "near_dedup" / "clusters.jsonl").read_bytes()
