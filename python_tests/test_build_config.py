"""Build configuration: tools/cuda_archs.py (AF2_EXT_CUDA_ARCHS for setup.py) and CMakeLists.txt agree with each
other and with torch's extension build. Needs no CUDA and builds nothing."""
import importlib.util
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_ARCHS_PY = os.path.join(ROOT, "tools", "cuda_archs.py")
CMAKELISTS = os.path.join(ROOT, "CMakeLists.txt")


def _load_cuda_archs():
    spec = importlib.util.spec_from_file_location("af2_ext_tools_cuda_archs", CUDA_ARCHS_PY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


ca = _load_cuda_archs()


def _cmake_text() -> str:
    with open(CMAKELISTS) as f:
        return f.read()


@pytest.mark.parametrize("value, expected", [
    ("80", "8.0+PTX"),
    ("8.0", "8.0+PTX"),
    ("90a", "9.0a+PTX"),
    ("9.0a", "9.0a+PTX"),
    ("sm_90a", "9.0a+PTX"),
    ("100a", "10.0a+PTX"),
    ("10.0a", "10.0a+PTX"),
    ("120", "12.0+PTX"),
    ("compute_90", "9.0+PTX"),
    ("sm_90+PTX", "9.0+PTX"),
    ("80;90", "8.0;9.0+PTX"),
    ("80,90", "8.0;9.0+PTX"),
    ("80 90", "8.0;9.0+PTX"),
    ("8.0, 9.0a", "8.0;9.0a+PTX"),
    (" ;80 ;, 90a, ", "8.0;9.0a+PTX"),
])
def test_torch_arch_list_forms(value, expected):
    assert ca.torch_arch_list(value) == expected


@pytest.mark.parametrize("value, expected", [
    ("80;8.0;sm_80;compute_80+PTX;90;9.0+PTX", "8.0;9.0+PTX"),
    ("90;90a;sm_90a", "9.0+PTX;9.0a"),  # 90 and 90a are different targets; the first listed wins the tie
    ("90a;90", "9.0a+PTX;9.0"),
])
def test_duplicates_dropped_in_order(value, expected):
    assert ca.torch_arch_list(value) == expected


@pytest.mark.parametrize("value, expected", [
    ("90;80", "9.0+PTX;8.0"),
    ("120;80;100a;90", "12.0+PTX;8.0;10.0a;9.0"),
    ("100a;120;80", "10.0a;12.0+PTX;8.0"),
    ("90+PTX;100", "9.0;10.0+PTX"),  # a '+PTX' in the input does not choose the PTX arch
])
def test_ptx_on_numerically_newest_regardless_of_order(value, expected):
    assert ca.torch_arch_list(value) == expected


@pytest.mark.parametrize("value, expected", [
    ("10.0f", [(10, 0, "f")]),
    ("100f;sm_120f", [(10, 0, "f"), (12, 0, "f")]),
    ("sm_86, 8.9", [(8, 6, ""), (8, 9, "")]),
])
def test_parse_archs(value, expected):
    assert [(a.major, a.minor, a.suffix) for a in ca.parse_archs(value)] == expected


def test_family_arch_refused_for_torch_naming_it():
    with pytest.raises(ValueError, match=r"AF2_EXT_CUDA_ARCHS.*'10\.0f'.*use 100 or 100a"):
        ca.torch_arch_list("80;10.0f")


@pytest.mark.parametrize("value", ["", " ", ";", " , ;"])
def test_empty_is_value_error(value):
    with pytest.raises(ValueError, match="AF2_EXT_CUDA_ARCHS is empty"):
        ca.torch_arch_list(value)


@pytest.mark.parametrize("value, bad", [
    ("garbage", "garbage"),
    ("80;sm_9x", "sm_9x"),
    ("8.0.1", "8.0.1"),
    ("90b", "90b"),
    ("90A", "90A"),
    ("80+ptx", "80+ptx"),
    ("sm80", "sm80"),
    ("80\n", "80\n"),
])
def test_unparsable_is_value_error_naming_item(value, bad):
    with pytest.raises(ValueError) as info:
        ca.torch_arch_list(value)
    message = str(info.value)
    assert "AF2_EXT_CUDA_ARCHS" in message and repr(bad) in message, message


@pytest.mark.parametrize("value, bad", [("75", "75"), ("sm_70", "sm_70"), ("7.5;8.0", "7.5"),
                                        ("90;compute_61", "compute_61"), ("80;75a", "75a")])
def test_below_sm80_is_value_error(value, bad):
    with pytest.raises(ValueError) as info:
        ca.torch_arch_list(value)
    message = str(info.value)
    assert "AF2_EXT_CUDA_ARCHS" in message and repr(bad) in message, message
    assert "sm_80 or newer" in message and "mma.sync m16n8k16 bf16" in message, message


@pytest.mark.parametrize("value, expected_flags", [
    ("80;90", {"-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
               "-gencode=arch=compute_90,code=compute_90"}),
    ("80;sm_90a", {"-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a",
                   "-gencode=arch=compute_90a,code=compute_90a"}),
    ("100a;120", {"-gencode=arch=compute_100a,code=sm_100a", "-gencode=arch=compute_120,code=sm_120",
                  "-gencode=arch=compute_120,code=compute_120"}),
    ("12.0a", {"-gencode=arch=compute_120a,code=sm_120a", "-gencode=arch=compute_120a,code=compute_120a"}),
])
def test_torch_accepts_what_we_emit(value, expected_flags, monkeypatch):
    cpp_extension = pytest.importorskip("torch.utils.cpp_extension")
    get_flags = getattr(cpp_extension, "_get_cuda_arch_flags", None)
    if get_flags is None:
        pytest.skip("this torch has no torch.utils.cpp_extension._get_cuda_arch_flags")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", ca.torch_arch_list(value))
    assert set(get_flags()) == expected_flags


@pytest.mark.parametrize("environ, expected", [
    ({}, "8.0;9.0+PTX"),
    ({"AF2_EXT_CUDA_ARCHS": ""}, "8.0;9.0+PTX"),  # empty = unset, as CMakeLists.txt treats it
    ({"TORCH_CUDA_ARCH_LIST": ""}, "8.0;9.0+PTX"),
    ({"AF2_EXT_CUDA_ARCHS": "sm_90a"}, "9.0a+PTX"),
    ({"TORCH_CUDA_ARCH_LIST": "8.6;Hopper"}, "8.6;Hopper"),  # inherited: as is
    ({"AF2_EXT_CUDA_ARCHS": "", "TORCH_CUDA_ARCH_LIST": "8.6"}, "8.6"),
    ({"AF2_EXT_CUDA_ARCHS": "90", "TORCH_CUDA_ARCH_LIST": "9.0+PTX"}, "9.0+PTX"),
])
def test_resolve_without_conflict(environ, expected):
    assert ca.resolve_arch_list(environ) == (expected, None)


def test_resolve_ours_wins_over_inherited_with_one_line_note():
    value, note = ca.resolve_arch_list({"AF2_EXT_CUDA_ARCHS": "90", "TORCH_CUDA_ARCH_LIST": "7.5;8.6+PTX"})
    assert value == "9.0+PTX"
    assert note is not None and "\n" not in note, note
    assert "AF2_EXT_CUDA_ARCHS" in note and "'7.5;8.6+PTX'" in note and "wins" in note, note


def test_resolve_validates_ours_even_with_torch_list_set():
    with pytest.raises(ValueError, match="sm_80 or newer"):
        ca.resolve_arch_list({"AF2_EXT_CUDA_ARCHS": "75", "TORCH_CUDA_ARCH_LIST": "8.0"})


def test_resolve_does_not_touch_the_environment(monkeypatch):
    monkeypatch.setenv("AF2_EXT_CUDA_ARCHS", "90")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6")
    before = dict(os.environ)
    ca.resolve_arch_list(os.environ)
    assert dict(os.environ) == before


def test_cuda_archs_imports_no_torch():
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import cuda_archs; "
            "assert 'torch' not in sys.modules, 'cuda_archs imported torch'")
    subprocess.run([sys.executable, "-c", code, os.path.join(ROOT, "tools")], check=True)


def test_arch_regex_and_minimum_same_as_cmake():
    text = _cmake_text()
    m = re.search(r'if\(NOT _arch MATCHES "([^"]+)"\)', text)
    assert m, "arch regex not found in CMakeLists.txt"
    cmake_regex = m.group(1).replace("\\\\", "\\")  # CMake string escapes: "\\." is the regex \.
    assert cmake_regex == "^" + ca._ARCH.pattern + "$"
    assert re.search(r"if\(_num LESS %d\)\s*\n\s*message\(FATAL_ERROR" % ca.MIN_ARCH, text), \
        f"CMakeLists.txt has no FATAL_ERROR for archs below {ca.MIN_ARCH}"
    assert re.search(r'set\(_af2_ext_default_archs "%s"\)' % re.escape(ca.DEFAULT), text), \
        f"CMakeLists.txt's default archs differ from {ca.DEFAULT!r}"


def test_cmake_kernel_flags_include_torch_nvcc_flags():
    cpp_extension = pytest.importorskip("torch.utils.cpp_extension")
    torch_flags = list(cpp_extension.COMMON_NVCC_FLAGS)
    torch_defines = [f[len("-D"):] for f in torch_flags if f.startswith("-D__CUDA_NO_")]
    assert torch_defines, f"no -D__CUDA_NO_* flags in COMMON_NVCC_FLAGS {torch_flags}"
    text = _cmake_text()

    m = re.search(r"set\(AF2_EXT_TORCH_NVCC_DEFINES\s+([^)]*)\)", text)
    assert m, "set(AF2_EXT_TORCH_NVCC_DEFINES ...) not found in CMakeLists.txt"
    cmake_defines = m.group(1).split()
    missing = [d for d in torch_defines if d not in cmake_defines]
    assert not missing, f"CMakeLists.txt does not give the kernels torch's defines {missing}"
    assert re.search(r"target_compile_definitions\(af2_ext_cuda_flags INTERFACE\s+"
                     r'"\$<\$<COMPILE_LANGUAGE:CUDA>:\$\{AF2_EXT_TORCH_NVCC_DEFINES\}>"\)', text), \
        "AF2_EXT_TORCH_NVCC_DEFINES is not applied to af2_ext_cuda_flags' CUDA sources"
    assert re.search(r"target_link_libraries\(af2_ext_kernels PUBLIC af2_ext_cuda_flags\)", text), \
        "af2_ext_kernels does not link af2_ext_cuda_flags"

    m = re.search(r"target_compile_options\(af2_ext_cuda_flags INTERFACE\s+\$<\$<COMPILE_LANGUAGE:CUDA>:([^>]*)>",
                  text)
    assert m, "af2_ext_cuda_flags' CUDA compile options not found in CMakeLists.txt"
    cuda_options = m.group(1).split()
    other = [f for f in torch_flags if not f.startswith("-D")]
    missing = [f for f in other if f not in cuda_options]
    assert not missing, f"CMakeLists.txt does not give the kernels torch's nvcc flags {missing}"
