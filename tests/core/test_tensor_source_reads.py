"""TensorSource answers membership from its index: a load reads each tensor's bytes once; the reads of
internvit.file_reads (threaded chunks, memory maps, page-cache drop-behind) give the file's bytes."""
import os

import pytest
import torch
from safetensors.torch import save_file

import internvit.checkpoints as ck
import internvit.file_reads as fr


def test_membership_reads_nothing_and_load_reads_each_tensor_once(tmp_path, monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    reads = []
    real = ck.read_safetensors_tensor
    monkeypatch.setattr(ck, "read_safetensors_tensor", lambda *a: reads.append(a[2]) or real(*a))
    src = ck.TensorSource()
    src._add_safetensors(str(tmp_path / "w.safetensors"))
    assert "0.weight" in src and "nope" not in src and reads == []
    with torch.device("meta"):
        target = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    ck.load_into(target, src)
    assert len(reads) == len(model.state_dict())  # once each (membership checks used to read them all too)
    for k, v in model.state_dict().items():
        assert torch.equal(target.state_dict()[k], v)


def test_large_tensors_read_by_threads_in_chunks_equal_the_file(tmp_path, monkeypatch):
    """The threaded read (chunks of odd size, more chunks than threads) gives the file's exact bytes; a file cut
    inside a tensor after it was opened raises CheckpointError from a worker thread, not a short tensor."""
    g = torch.Generator().manual_seed(0)
    sd = {"a": torch.randn(37, 29, generator=g), "b": torch.randn(1000, generator=g).to(torch.bfloat16),
          "c": torch.arange(7, dtype=torch.int64)}
    path = str(tmp_path / "w.safetensors")
    save_file(sd, path)
    monkeypatch.setattr(fr, "PARALLEL_READ_MIN_BYTES", 64)
    monkeypatch.setattr(fr, "_READ_CHUNK_BYTES", 100)
    monkeypatch.setattr(fr, "io_threads", lambda: 3)
    threaded = []
    real = fr._read_exact
    monkeypatch.setattr(fr, "_read_exact", lambda *a: threaded.append(len(a[1])) or real(*a))
    src = ck.open_weights(path)
    for k, v in sd.items():
        assert torch.equal(src[k], v), k
    # "a" (4292 bytes) and "b" (2000) in 100-byte chunks; "c" (56 bytes, under the threshold) in one read
    assert threaded.count(100) == 42 + 20 and sorted(set(threaded)) == [56, 92, 100]
    src = ck.open_weights(path)  # the header is checked at open; the file shrinks afterwards
    os.truncate(path, os.path.getsize(path) - 3000)
    with pytest.raises(ck.CheckpointError, match="truncated"):
        for k in sd:
            src[k]


def _in_map(t: torch.Tensor, path: str) -> bool:
    p = t.untyped_storage().data_ptr()
    return any(lo <= p < hi for lo, hi, _ in fr.file_mappings(path))


def test_load_model_mmap_gives_copy_on_write_views_of_the_file_and_the_same_weights(tmp_path):
    import internvit

    model = internvit.load_model("internvit-6b-tiny")
    folder = str(tmp_path / "hf")
    internvit.save_model(model, folder)
    path = ck.find_weight_files(folder)[0]
    copied = internvit.load_model(folder, dtype=None)
    mapped = internvit.load_model(folder, dtype=None, mmap=True)
    ref = model.state_dict()
    for k, v in mapped.state_dict().items():
        assert torch.equal(v, ref[k]) and torch.equal(copied.state_dict()[k], ref[k]), k
    assert all(_in_map(p, path) for p in mapped.parameters())
    assert not any(_in_map(p, path) for p in copied.parameters())
    before = open(path, "rb").read()
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(mapped(x).last_hidden_state, copied(x).last_hidden_state)
        for p in mapped.parameters():
            p.add_(1.0)  # private map: the process's pages change, the file does not
    assert open(path, "rb").read() == before
    # a cast needs a copy: nothing is left pointing into the map
    cast = internvit.load_model(folder, dtype=torch.bfloat16, mmap=True)
    assert not any(_in_map(p, path) for p in cast.parameters())


def test_mmap_falls_back_to_a_copy_for_an_offset_the_dtype_cannot_start_at(tmp_path):
    """The format does not promise alignment: a header of odd length puts the data at an offset an fp32 tensor
    cannot be viewed at; that tensor is read into its own memory, the 2-byte one next to it is mapped."""
    import json
    import struct

    a, b = torch.arange(6, dtype=torch.float32).reshape(2, 3), torch.tensor([1.5, -2.0], dtype=torch.bfloat16)
    header = {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
              "b": {"dtype": "BF16", "shape": [2], "data_offsets": [24, 28]}}
    raw = json.dumps(header).encode()
    raw += b" " * ((2 - (8 + len(raw)) % 4) % 4)  # data starts at 2 (mod 4)
    path = str(tmp_path / "odd.safetensors")
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + a.numpy().tobytes() + b.view(torch.int16).numpy().tobytes())
    assert (8 + len(raw)) % 4 == 2
    src = ck.open_weights(path, mmap=True)
    ta, tb = src["a"], src["b"]
    assert torch.equal(ta, a) and torch.equal(tb, b)
    assert not _in_map(ta, path) and _in_map(tb, path)


def test_mmap_torch_checkpoint_tensors_stay_in_the_map(tmp_path):
    sd = {"w": torch.randn(64, 64), "b": torch.randn(64)}
    path = str(tmp_path / "w.pth")
    torch.save(sd, path)
    mapped, copied = ck.open_weights(path, mmap=True), ck.open_weights(path)
    for k, v in sd.items():
        assert torch.equal(mapped[k], v) and torch.equal(copied[k], v)
    assert _in_map(mapped["w"], path) and not _in_map(copied["w"], path)


def test_io_threads_follows_the_cpus_this_process_may_use(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3}, raising=False)
    assert fr.io_threads() == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert fr.io_threads() == 8

    def unavailable(pid):
        raise OSError("no affinity here")

    monkeypatch.setattr(os, "sched_getaffinity", unavailable, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert fr.io_threads() == 1


def test_drop_behind_when_the_files_and_their_copy_do_not_both_fit(monkeypatch):
    avail = fr.available_memory()
    assert avail is None or avail > 0
    monkeypatch.setattr(fr, "available_memory", lambda: 1000)
    assert fr.drop_behind_for(451) and not fr.drop_behind_for(450)  # 2 x bytes against 0.9 x available
    monkeypatch.setattr(fr, "available_memory", lambda: None)  # unknown: never drop
    assert not fr.drop_behind_for(10**15)


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_a_copying_load_too_big_for_memory_drops_what_it_copied_from_the_page_cache(tmp_path, monkeypatch, fmt):
    """With too little memory for the files and their copy (MemAvailable faked small), a copying load leaves the
    tensor bytes it copied out of the page cache (safetensors: threaded chunks and single reads; .pth: chunks
    copied out of its memory map), and the tensors are the file's; with room, or with mmap=True, the cached
    pages stay."""
    import mmap as mmap_module

    page = mmap_module.PAGESIZE
    g = torch.Generator().manual_seed(0)
    sd = {"big": torch.randn(512, 1024, generator=g), "small": torch.randn(3, 5, generator=g)}
    path = str(tmp_path / f"w.{fmt}")
    if fmt == "pth":
        torch.save(sd, path)
    else:
        save_file(sd, path)
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages are never dropped: write them back first
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        dropped = fr.page_cache_bytes(path)
    finally:
        os.close(fd)

    def warm() -> int:
        with open(path, "rb") as f:
            while f.read(1 << 20):
                pass
        return fr.page_cache_bytes(path)

    if dropped < 0:
        pytest.skip("the page cache cannot be observed here (not Linux)")
    assert warm() >= size - page  # mincore sees a file just read
    if _fs_type(str(tmp_path)) in ("tmpfs", "ramfs"):
        pytest.skip(f"{tmp_path} is on a memory file system: its pages cannot leave the cache")
    assert dropped <= page  # POSIX_FADV_DONTNEED after fsync empties it here
    monkeypatch.setattr(fr, "PARALLEL_READ_MIN_BYTES", 1 << 20)
    monkeypatch.setattr(fr, "_READ_CHUNK_BYTES", 64 * 1024 + 100)  # chunks not page-aligned
    monkeypatch.setattr(fr, "io_threads", lambda: 2)
    for avail, mmap, cached_after in ((10 * size, False, size), (size, True, size), (size, False, 0)):
        monkeypatch.setattr(fr, "available_memory", lambda avail=avail: avail)
        assert warm() >= size - page
        src = ck.open_weights(path, mmap=mmap)
        for k, v in sd.items():
            assert torch.equal(src[k], v), k
        cached = fr.page_cache_bytes(path)
        # only pages the reads did not cover whole stay: the header's and those a chunk boundary cuts
        assert abs(cached - cached_after) <= (2 * 32 + 4) * page, (avail, mmap, cached)


def _fs_type(path: str) -> str:
    """The type of the file system holding ``path`` (longest mount point of ``/proc/mounts`` above it)."""
    best, kind = "", ""
    with open("/proc/mounts", encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            mount = parts[1].replace("\\040", " ")
            if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
                best, kind = mount, parts[2]
    return kind


def _write_tree(root, files: dict) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_cgroup_memory_room_takes_the_tightest_limit_of_the_cgroup_and_its_ancestors(tmp_path):
    """Containers: the page cache is charged to the cgroup, so its limit decides (v2 and v1 layouts)."""
    v2 = tmp_path / "v2"
    _write_tree(v2, {"cgroup.controllers": "cpu memory\n",
                     "pod/memory.max": "10000\n", "pod/memory.current": "8000\n",
                     "pod/memory.stat": "anon 5000\nfile 3000\n",  # room 10000 - 8000 + 3000 = 5000
                     "pod/app/memory.max": "max\n", "pod/app/memory.current": "7000\n",
                     "pod/app/memory.stat": "anon 7000\nfile 0\n"})
    (tmp_path / "proc_v2").write_text("0::/pod/app\n")
    assert fr.cgroup_memory_room(str(tmp_path / "proc_v2"), str(v2)) == 5000
    (v2 / "pod/app/memory.max").write_text("7500\n")  # a tighter limit below: 7500 - 7000 + 0
    assert fr.cgroup_memory_room(str(tmp_path / "proc_v2"), str(v2)) == 500
    v1 = tmp_path / "v1"
    _write_tree(v1, {"memory/memory.limit_in_bytes": "9223372036854771712\n",  # v1's "no limit"
                     "memory/memory.usage_in_bytes": "1\n", "memory/memory.stat": "total_cache 0\n",
                     "memory/job/memory.limit_in_bytes": "4096\n", "memory/job/memory.usage_in_bytes": "4000\n",
                     "memory/job/memory.stat": "cache 10\ntotal_cache 1000\n"})
    (tmp_path / "proc_v1").write_text("5:devices:/\n4:memory:/job\n0::/\n")
    assert fr.cgroup_memory_room(str(tmp_path / "proc_v1"), str(v1)) == 4096 - 4000 + 1000
    (v1 / "memory/job/memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert fr.cgroup_memory_room(str(tmp_path / "proc_v1"), str(v1)) is None  # no limit anywhere
    assert fr.cgroup_memory_room(str(tmp_path / "missing"), str(v1)) is None


def test_available_memory_inside_a_real_memory_cgroup(tmp_path):
    """A process in a memory cgroup limited to 2 GiB sees at most that much (root and a writable cgroup
    file system needed; skipped otherwise)."""
    import subprocess
    import sys

    lines = open("/proc/self/cgroup").read().splitlines() if os.path.exists("/proc/self/cgroup") else []
    v2 = os.path.isfile("/sys/fs/cgroup/cgroup.controllers")
    rel = next((ln.split(":", 2)[2] for ln in lines
                if (v2 and ln.startswith("0::")) or (not v2 and "memory" in ln.split(":", 2)[1].split(","))), None)
    base = os.path.join("/sys/fs/cgroup" if v2 else "/sys/fs/cgroup/memory", (rel or "/").strip("/"))
    group = os.path.join(base, f"internvit-test-{os.getpid()}")
    limit = 2 * 1024**3  # the child imports torch
    try:
        os.mkdir(group)
    except OSError as e:
        pytest.skip(f"cannot create a memory cgroup here ({e.strerror}): needs root and a writable cgroup fs")
    try:
        try:
            with open(os.path.join(group, "memory.max" if v2 else "memory.limit_in_bytes"), "w") as f:
                f.write(str(limit))
        except OSError as e:
            pytest.skip(f"cannot set a memory limit here ({e.strerror})")
        code = ("import os, sys; open(sys.argv[1], 'w').write(str(os.getpid())); "
                "import internvit.file_reads as fr; print(fr.available_memory(), fr.cgroup_memory_room())")
        out = subprocess.run([sys.executable, "-c", code, os.path.join(group, "cgroup.procs")], check=True,
                             capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(
                                 os.path.dirname(os.path.abspath(__file__))))).stdout.split()
        avail, room = int(out[0]), int(out[1])
        # room is read after avail, while the child still allocates: it may have shrunk by a few pages since
        assert 0 < room <= limit and avail <= room + 64 * 2**20 and avail <= limit
    finally:
        os.rmdir(group)
