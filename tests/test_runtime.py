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


# A fresh interpreter that turns the scripts' compile cache on and compiles one function: prints the cache dir,
# whether JAX found the executable there, the cache's size limit, and the `sslvit.runtime` warnings.
CACHE_PROBE = textwrap.dedent("""
    import logging, sys
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")
    from sslvit import runtime
    path = runtime.enable_compile_cache()
    print(path)
    if path is None:
        print("jax" in sys.modules)
        sys.exit(0)
    import jax, jax.numpy as jnp
    hits = []
    jax.monitoring.register_event_listener(lambda e, **kw: hits.append(e == "/jax/compilation_cache/cache_hits"))
    jax.jit(lambda x: jnp.tanh(x @ x.T).sum())(jnp.ones((64, 64))).block_until_ready()
    print(any(hits), jax.config.jax_compilation_cache_max_size)
""")


def _cache_probe(tmp_path, **env_vars):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env.update(XDG_CACHE_HOME=str(tmp_path / "xdg"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", **env_vars)
    out = subprocess.run([sys.executable, "-c", CACHE_PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split(), out.stderr


def test_compiled_steps_persist_in_the_user_cache_between_starts(tmp_path):
    """By default a script's compiles go to ~/.cache/sslvit/jax ($XDG_CACHE_HOME), bounded to 2 GiB: the first
    start writes the executable, the second loads it instead of compiling."""
    (first, _), (second, _) = _cache_probe(tmp_path), _cache_probe(tmp_path)
    cache = tmp_path / "xdg" / "sslvit" / "jax"
    assert first == [str(cache), "False", str(2 * 2**30)]
    assert second == [str(cache), "True", str(2 * 2**30)]
    assert any(p.name.endswith("-cache") for p in cache.iterdir())


def test_compile_cache_dir_from_the_environment_or_off(tmp_path):
    """JAX_COMPILATION_CACHE_DIR names another dir (its size limit is the user's: JAX's default, none), set empty it
    turns the cache off; a dir that cannot be made is one warning and a run without the cache."""
    own = tmp_path / "own"
    out, _ = _cache_probe(tmp_path, JAX_COMPILATION_CACHE_DIR=str(own))
    assert out == [str(own), "False", "-1"] and any(own.iterdir())
    out, err = _cache_probe(tmp_path, JAX_COMPILATION_CACHE_DIR="")
    assert out == ["None", "False"] and not err  # off: JAX not even imported, nothing said
    (tmp_path / "a_file").write_text("")
    out, err = _cache_probe(tmp_path, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "a_file" / "jax"))
    assert out == ["None", "False"]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "compiled steps are not cached" in lines[0] and "JAX_COMPILATION_CACHE_DIR" in lines[0]
