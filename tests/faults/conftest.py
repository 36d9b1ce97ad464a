"""Fixtures of the fault suite: one tiny world (token store, teacher, SAE) for the whole session, a Ray
session per module that asks for one, and one torch thread (a shared 2-core machine, bit-exact runs)."""

import os
import shutil
import tempfile

import pytest
from test_attribution import save_teacher, save_tiny_sae, tiny_gpt2, tiny_sae
from test_extract_checks import make_token_store

from .faultkit import synthetic_labels


@pytest.fixture(scope="session")
def world(tmp_path_factory, tokenizer_dir):
    """tokens/ (about 5.9k random ids: 103 train + 21 val units of 3 windows of 16), teacher/ (3 blocks,
    d 32, with the store's tokenizer), sae_ckpt/ (96 latents, k 8; not named `sae`, which would shadow
    the package on a Ray worker's path when a driver runs from this folder)."""
    root = tmp_path_factory.mktemp("faults")
    make_token_store(root / "tokens", tokenizer_dir, n_docs=200)
    save_teacher(tiny_gpt2(), root / "teacher", tokenizer_dir)
    save_tiny_sae(tiny_sae(), root / "sae_ckpt")
    return root


@pytest.fixture(scope="session")
def synthetic(world):
    """A complete label store over world/tokens written through the storage API (no teacher, no Ray)."""
    synthetic_labels(world / "synthetic", world / "tokens")
    return world / "synthetic"


@pytest.fixture
def copy_of(tmp_path):
    """copy_of(store) -> a fresh copy in this test's folder, to damage freely."""
    def copy(store, name=None):
        return shutil.copytree(store, tmp_path / (name or store.name))
    return copy


@pytest.fixture(scope="module")
def ray_session():
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, _temp_dir=tmp,
             log_to_driver=False)
    yield
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)
