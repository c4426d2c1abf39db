"""The native kernel's cache key: a build is reused only on a CPU with the same target features (pure, no compile).

A home directory shared between machines must never load an AVX-512 build on a CPU without AVX-512 (SIGILL).
"""

from __future__ import annotations

from edgellm.quant.native import cache_key

AVX2 = '#define __x86_64__ 1\n#define __AVX2__ 1\n#define __FMA__ 1\n#define __VERSION__ "12.2.0"\n'
AVX512 = AVX2 + "#define __AVX512F__ 1\n#define __AVX512BW__ 1\n#define __AVX512VL__ 1\n"


def test_different_target_features_give_different_keys() -> None:
    assert cache_key("/usr/bin/cc", "x86_64", AVX2) != cache_key("/usr/bin/cc", "x86_64", AVX512)
    amx = AVX512 + "#define __AMX_TILE__ 1\n"
    assert cache_key("/usr/bin/cc", "x86_64", AVX512) != cache_key("/usr/bin/cc", "x86_64", amx)
    newer_compiler = AVX2.replace('"12.2.0"', '"13.1.0"')
    assert cache_key("/usr/bin/cc", "x86_64", AVX2) != cache_key("/usr/bin/cc", "x86_64", newer_compiler)


def test_same_target_features_give_the_same_key() -> None:
    key = cache_key("/usr/bin/cc", "x86_64", AVX512)
    assert key == cache_key("/usr/bin/cc", "x86_64", AVX512)
    reordered = "\n".join(reversed(AVX512.splitlines())) + "\n\n"  # the compiler's order is not part of the key
    assert key == cache_key("/usr/bin/cc", "x86_64", reordered)
    assert len(key) == 16 and int(key, 16) >= 0


def test_compiler_and_machine_are_part_of_the_key() -> None:
    key = cache_key("/usr/bin/cc", "x86_64", AVX2)
    assert key != cache_key("/usr/bin/clang", "x86_64", AVX2)
    assert key != cache_key("/usr/bin/cc", "aarch64", AVX2)
