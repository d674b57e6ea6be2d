"""The QNN HTP compatibility interposer: build, cache, symbols, config re-pack and forwarding.

Everything here runs without QNN: a fake "real" libQnnHtp.so (compiled from the C below) stands
in for the backend, so the forwarding and re-pack logic is checked byte for byte. The ctypes
checks run in a child process so the fake library never shares a process with the real one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from s2dit_deploy.targets.qnn import libs

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")

FAKE_QNN = r"""
#include <stdint.h>
#include <string.h>
typedef struct { uint32_t option; void* custom; } DeviceConfig;
static uint32_t seen_option = 0xffffffff, seen_payload[2];
static uint64_t device_create(void* log, const DeviceConfig** cfg, void** dev) {
  (void)log;
  if (!cfg || !cfg[0]) return 1;
  const unsigned char* c = (const unsigned char*)cfg[0]->custom;
  memcpy(&seen_option, c, 4);
  memcpy(seen_payload, c + 8, 8);   /* QNN 2.4x reads the union at offset 8 */
  *dev = (void*)0x1234;
  return 0;
}
static uint64_t has_capability(uint32_t key) { return key == 7 ? 42 : 0; }
static struct { uint32_t backendId; const char* name; uint32_t ver[6]; void* fn[64]; } provider = {
  6, "FAKE_HTP", {2, 51, 0, 5, 0, 0}, {0}};
static const void* list[1] = {&provider};
uint64_t QnnInterface_getProviders(const void*** out, uint32_t* n) {
  provider.fn[0] = (void*)has_capability;
  provider.fn[40] = (void*)device_create;
  *out = list; *n = 1; return 0;
}
uint32_t fake_seen_option(void) { return seen_option; }
uint32_t fake_seen_payload(int i) { return seen_payload[i]; }
"""

CHILD = r"""
import ctypes, os, sys, struct
inter = ctypes.CDLL(sys.argv[1])
fake = ctypes.CDLL(sys.argv[2])
# 1. re-pack unit: 2.37 layout {opt, soc, extra} -> 2.4x layout {opt, pad, soc, extra}
old = (ctypes.c_uint32 * 3)(0, 69, 7)
new = (ctypes.c_uint32 * 4)(9, 9, 9, 9)
inter.s2dit_qnn_compat_repack(old, new)
assert list(new) == [0, 0, 69, 7], list(new)
# 2. forwarding: providers come from the fake library, deviceCreate is wrapped, the rest intact
plist = ctypes.POINTER(ctypes.c_void_p)()
n = ctypes.c_uint32()
inter.QnnInterface_getProviders.restype = ctypes.c_uint64
assert inter.QnnInterface_getProviders(ctypes.byref(plist), ctypes.byref(n)) == 0, inter.s2dit_qnn_compat_last_error()
assert n.value == 1
base = plist[0]
assert struct.unpack("I", ctypes.string_at(base, 4))[0] == 6
fns = ctypes.cast(base + 40, ctypes.POINTER(ctypes.c_void_p))
cap = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_uint32)(fns[0])
assert cap(7) == 42
class DeviceConfig(ctypes.Structure):
    _fields_ = [("option", ctypes.c_uint32), ("custom", ctypes.c_void_p)]
soc_cfg = (ctypes.c_uint32 * 3)(0, 69, 0)   # as ExecuTorch 1.5.1 writes it: socModel at offset 4
dc = DeviceConfig(0, ctypes.cast(soc_cfg, ctypes.c_void_p))
arr = (ctypes.POINTER(DeviceConfig) * 2)(ctypes.pointer(dc), None)
dev = ctypes.c_void_p()
create = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)(fns[40])
assert create(None, ctypes.cast(arr, ctypes.c_void_p), ctypes.byref(dev)) == 0
fake.fake_seen_option.restype = fake.fake_seen_payload.restype = ctypes.c_uint32
assert fake.fake_seen_option() == 0 and fake.fake_seen_payload(0) == 69, fake.fake_seen_payload(0)
assert dev.value == 0x1234
inter.s2dit_qnn_compat_repacked.restype = ctypes.c_ulong
assert inter.s2dit_qnn_compat_repacked() == 1
assert list(soc_cfg) == [0, 69, 0]  # the caller's config is not modified
print("ok")
"""


@pytest.fixture(scope="module")
def fake_real(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fakeqnn")
    (d / "fake.c").write_text(FAKE_QNN)
    lib = d / "libFakeQnnHtp.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(lib), str(d / "fake.c")], check=True)
    return lib


@pytest.fixture(scope="module")
def built(tmp_path_factory, fake_real) -> Path:
    return libs.build_interposer(fake_real, cache_dir=tmp_path_factory.mktemp("cache"))


def test_build_exports_and_soname(built: Path):
    assert built.name == "libQnnHtp.so" and built.parent.name != ""
    syms = subprocess.run(["nm", "-D", "--defined-only", str(built)], capture_output=True, text=True, check=True).stdout
    for sym in ("QnnInterface_getProviders", "s2dit_qnn_compat_repack", "s2dit_qnn_compat_version"):
        assert sym in syms
    dyn = subprocess.run(["readelf", "-d", str(built)], capture_output=True, text=True, check=True).stdout
    assert "[libQnnHtp.so]" in dyn  # the SONAME ExecuTorch's dlopen("libQnnHtp.so") matches


def test_repack_and_forwarding_through_fake_backend(built: Path, fake_real: Path):
    env = {**os.environ, "S2DIT_QNN_HTP_LIB": str(fake_real)}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(built), str(fake_real)], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_cache_hit_and_rebuild_on_source_change(tmp_path: Path, fake_real: Path):
    first = libs.build_interposer(fake_real, cache_dir=tmp_path)
    mtime = first.stat().st_mtime_ns
    assert libs.build_interposer(fake_real, cache_dir=tmp_path) == first
    assert first.stat().st_mtime_ns == mtime
    src = tmp_path / "changed.c"
    src.write_text(libs.SOURCE.read_text() + "\n/* changed */\n")
    second = libs.build_interposer(fake_real, cache_dir=tmp_path, source=src)
    assert second != first and second.is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_build_failure_is_clear(tmp_path: Path, fake_real: Path):
    bad = tmp_path / "bad.c"
    bad.write_text("this is not C;\n")
    with pytest.raises(libs.InterposerBuildError, match="building the QNN compatibility interposer failed"):
        libs.build_interposer(fake_real, cache_dir=tmp_path / "c", source=bad)
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())
    with pytest.raises(libs.InterposerBuildError, match="needs a C compiler"):
        libs.build_interposer(fake_real, cache_dir=tmp_path / "d", cc="no-such-compiler-s2dit")


def test_missing_libraries_say_how_to_supply_them(tmp_path: Path, monkeypatch):
    with pytest.raises(libs.QnnLibrariesMissing, match="QNN_SDK_ROOT"):
        libs.find_qnn_libraries({"QNN_SDK_ROOT": str(tmp_path)})
    monkeypatch.setattr(libs, "_wheel_dir", lambda: None)
    with pytest.raises(libs.QnnLibrariesMissing, match="pip install onnxruntime-qnn"):
        libs.find_qnn_libraries({})


def test_sdk_root_wins_and_cache_dir_follows_xdg(tmp_path: Path):
    lib_dir = tmp_path / "sdk" / libs.HOST_LIB_DIR
    lib_dir.mkdir(parents=True)
    (lib_dir / "libQnnHtp.so").write_bytes(b"")
    found = libs.find_qnn_libraries({"QNN_SDK_ROOT": str(tmp_path / "sdk")})
    assert found.source == "QNN_SDK_ROOT" and found.htp == lib_dir / "libQnnHtp.so"
    assert libs.cache_root({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "s2dit-deploy" / "qnn"
    env = libs.runtime_env(libs.QnnLibs("onnxruntime-qnn", lib_dir, "2.51", tmp_path / "i" / "libQnnHtp.so"))
    assert env["LD_LIBRARY_PATH"].split(":")[:2] == [str(tmp_path / "i"), str(lib_dir)]
    assert env["S2DIT_QNN_HTP_LIB"] == str(lib_dir / "libQnnHtp.so")
