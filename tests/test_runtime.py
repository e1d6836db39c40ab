"""Process-level settings (sslvit/runtime.py), checked in fresh interpreters: they act before JAX starts."""

import os
import subprocess
import sys
import textwrap

import pytest

# A jitted function whose XLA temporary arena is tens of MiB (a chain of large intermediates); minor page faults of
# its second and third calls, after a warm-up.
PROBE = textwrap.dedent("""
    import resource, sys
    from sslvit.runtime import keep_host_memory
    applied = keep_host_memory()
    import jax, jax.numpy as jnp
    f = jax.jit(lambda x: (jnp.sin(x @ x.T) @ x).sum() + jnp.cos(x.T @ x).sum())
    x = jnp.ones((3072, 3072)) / 3072
    f(x).block_until_ready()
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(2):
        f(x).block_until_ready()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / 2
    print(applied, faults * resource.getpagesize() / 2**20)
""")


def _probe(env_value):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("SSLVIT_HOST_MALLOC", None)
    if env_value is not None:
        env["SSLVIT_HOST_MALLOC"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    applied, mib = out.stdout.split()[-2:]
    return applied == "True", float(mib)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_host_memory_is_reused_between_steps():
    """glibc's default maps and unmaps XLA's per-call temporary arena: every call page-faults it afresh. With
    keep_host_memory the memory is reused: (almost) no new faults per call. SSLVIT_HOST_MALLOC=default opts out."""
    applied, kept_mib = _probe(None)
    default_applied, default_mib = _probe("default")
    assert applied and not default_applied
    assert default_mib > 50, f"expected the default allocator to fault the arena each call, got {default_mib} MiB"
    assert kept_mib < 0.1 * default_mib, (kept_mib, default_mib)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_not_applied_where_an_accelerator_plugin_is_installed(tmp_path):
    """With no JAX_PLATFORMS, an installed PJRT plugin (the `jax_plugins` namespace, as jax-cuda13-pjrt installs
    `jax_plugins.xla_cuda13`) means JAX will not run on the CPU: the setting is left off (it slowed GPU compiles)."""
    (tmp_path / "jax_plugins" / "xla_fake").mkdir(parents=True)
    (tmp_path / "jax_plugins" / "xla_fake" / "__init__.py").write_text("")
    code = "from sslvit.runtime import keep_host_memory; print(keep_host_memory())"
    for plugin, expected in ((True, "False"), (False, "True")):
        env = {
            k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "JAX_PLATFORM_NAME", "SSLVIT_HOST_MALLOC")
        }
        if plugin:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
        assert out.stdout.strip() == expected, (plugin, out.stdout, out.stderr[-1000:])
