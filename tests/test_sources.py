"""Data sources: phantom clients, image folders and CSV manifests, against what was written to disk."""

from __future__ import annotations

import csv
import logging
import pickle
import zlib

import grain
import numpy as np
import pytest
from PIL import Image

from ultrajax.data import phantom, sources

TABLE_1_COUNTS = (
  25727,
  35626,
  150243,
  12400,
  126918,
  115263,
  17412,
  118485,
  21214,
  42226,
  11143,
  11499,
  20378,
  10553,
  63426,
  235633,
)


def _assert_same_record(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def test_phantom_source_records_do_not_depend_on_access_order():
  first, second = (
    sources.PhantomSource("site", "thyroid", "linear", 10, 32, seed=7) for _ in range(2)
  )
  a5, a2 = first[5], first[2]
  b2, b5 = second[2], second[5]
  _assert_same_record(a5, b5)
  _assert_same_record(a2, b2)
  # The documented seeding: (seed, crc32 of the client name, index).
  _assert_same_record(
    a5,
    phantom.generate(np.random.default_rng([7, zlib.crc32(b"site"), 5]), "thyroid", "linear", 32),
  )
  assert not np.array_equal(a5["image"], a2["image"])
  other_client = sources.PhantomSource("site2", "thyroid", "linear", 10, 32, seed=7)
  other_seed = sources.PhantomSource("site", "thyroid", "linear", 10, 32, seed=8)
  assert not np.array_equal(other_client[5]["image"], a5["image"])
  assert not np.array_equal(other_seed[5]["image"], a5["image"])
  with pytest.raises(IndexError):
    first[10]


def test_phantom_source_pickles_and_feeds_grain():
  source = sources.PhantomSource("site", "kidney", "convex", 4, 32, seed=1)
  _assert_same_record(pickle.loads(pickle.dumps(source))[3], source[3])
  ds = grain.MapDataset.source(source)
  assert len(ds) == 4
  np.testing.assert_array_equal(ds[1]["image"], source[1]["image"])


def test_default_clients_follow_table_1():
  assert len(sources.DEFAULT_CLIENTS) == 16
  assert tuple(n for *_, n in sources.DEFAULT_CLIENTS) == TABLE_1_COUNTS
  for name, organ, probe, _ in sources.DEFAULT_CLIENTS:
    assert organ in phantom.ORGANS or (organ == sources.MIXED and probe == ""), name
    assert probe in ("", *phantom.PROBES)
  assert sources.DEFAULT_CLIENTS[0][:3] == ("BUV", "breast", "linear")
  assert sources.DEFAULT_CLIENTS[2][:2] == ("EchoNet-Dynamic", "heart")


def test_default_client_sources_counts():
  clients = sources.default_client_sources(scale=0.001, image_size=32, seed=0)
  # floor(count / 1000), raised to 64 where smaller.
  assert [len(c) for c in clients] == [
    64,
    64,
    150,
    64,
    126,
    115,
    64,
    118,
    64,
    64,
    64,
    64,
    64,
    64,
    64,
    235,
  ]
  clients = sources.default_client_sources(
    scale=0.01, image_size=32, seed=0, num_clients=4, min_images=200
  )
  assert [len(c) for c in clients] == [257, 356, 1502, 200]
  assert [c.name for c in clients] == ["BUV", "CLUST", "EchoNet-Dynamic", "FETAL-PLANES"]
  assert [c.probe for c in clients] == ["linear", "convex", "convex", "convex"]
  for bad in (0, 17):
    with pytest.raises(ValueError, match="num_clients"):
      sources.default_client_sources(scale=0.01, image_size=32, seed=0, num_clients=bad)


def test_mixed_client_draws_organs_with_their_probes():
  mixed = sources.default_client_sources(scale=1e-4, image_size=32, seed=0)[-1]
  assert mixed.name == "PrivateUS" and mixed.probe == ""
  records = [mixed[i] for i in range(12)]
  assert len({r["organ"] for r in records}) > 3
  assert all(r["probe"] == sources.ORGAN_PROBE[r["organ"]] for r in records)


def _write_tree(root):
  """Two clients of lossless images (and one JPEG); returns {path: expected array}."""
  rng = np.random.default_rng(0)
  grey = rng.integers(0, 256, (20, 30), np.uint8)
  rgb = rng.integers(0, 256, (16, 12, 3), np.uint8)
  wide = rng.integers(0, 65536, (10, 14)).astype(np.uint16)
  rgba = rng.integers(0, 256, (9, 11, 4), np.uint8)
  smooth = np.tile(np.linspace(0, 255, 32).astype(np.uint8), (24, 1))
  (root / "site_b" / "nested" / "deeper").mkdir(parents=True)
  (root / "site_a").mkdir()
  files = {
    root / "site_b" / "grey.png": (grey, grey),
    root / "site_b" / "nested" / "deeper" / "colour.BMP": (rgb, rgb),
    # 16 bits -> 8: v / 257 rounded (65535 -> 255).
    root / "site_b" / "nested" / "wide.png": (wide, np.round(wide / 257.0).astype(np.uint8)),
    root / "site_b" / "alpha.png": (rgba, rgba[..., :3]),
    root / "site_a" / "scan.JPEG": (smooth, smooth),
  }
  for path, (data, _) in files.items():
    Image.fromarray(data).save(path)
  (root / "site_b" / "notes.txt").write_text("not an image")
  (root / "site_b" / "._grey.png").write_bytes(b"AppleDouble metadata")
  return {str(p): expected for p, (_, expected) in files.items()}


def test_folder_clients_decode_what_was_written(tmp_path):
  expected = _write_tree(tmp_path)
  assert Image.open(tmp_path / "site_b" / "nested" / "wide.png").mode.startswith("I")
  clients = sources.folder_clients(tmp_path, probe="linear")
  assert [c.name for c in clients] == ["site_a", "site_b"]
  assert [len(c) for c in clients] == [1, 4]
  assert clients[1].paths == sorted(p for p in expected if "/site_b/" in p)
  for client in clients:
    assert client.probe == "linear"
    for i in range(len(client)):
      record = client[i]
      want = expected[record["path"]]
      assert record["image"].dtype == np.uint8 and record["image"].shape == want.shape, record[
        "path"
      ]
      assert record["probe"] == "linear"
      if record["path"].endswith(".JPEG"):  # lossy
        assert np.abs(record["image"].astype(int) - want).mean() < 3
      else:
        np.testing.assert_array_equal(record["image"], want, err_msg=record["path"])
  clone = pickle.loads(pickle.dumps(clients[1]))
  np.testing.assert_array_equal(clone[2]["image"], clients[1][2]["image"])


def test_folder_of_images_is_one_client(tmp_path):
  root = tmp_path / "my_site"
  root.mkdir()
  for i in range(3):
    Image.fromarray(np.full((8, 8), i, np.uint8)).save(root / f"{i}.png")
  (client,) = sources.folder_clients(root)
  assert client.name == "my_site" and len(client) == 3 and client.probe == ""
  assert client[2]["image"][0, 0] == 2


def test_folder_errors_name_the_culprit(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    sources.folder_clients(tmp_path / "nowhere")
  with pytest.raises(ValueError, match="no sub-directories"):
    sources.folder_clients(tmp_path)
  _write_tree(tmp_path)
  (tmp_path / "site_empty" / "sub").mkdir(parents=True)
  with pytest.raises(ValueError, match="site_empty"):
    sources.folder_clients(tmp_path)


def _client_with_bad_files(root, on_bad_image):
  root.mkdir()
  for i in range(4):
    Image.fromarray(np.full((6, 6), 10 * i, np.uint8)).save(root / f"{i}.png")
  (root / "1.png").write_bytes(b"not a png")
  good = (root / "3.png").read_bytes()
  (root / "3.png").write_bytes(good[: len(good) // 2])  # truncated
  return sources.FolderSource("site", sources._images_under(str(root)), on_bad_image=on_bad_image)


def test_bad_image_skip_serves_the_next_record_and_warns_once(tmp_path, caplog):
  client = _client_with_bad_files(tmp_path / "site", "skip")
  with caplog.at_level(logging.WARNING):
    first, again = client[1], client[1]
  assert len(client) == 4
  assert first["path"].endswith("2.png") and first["image"][0, 0] == 20
  np.testing.assert_array_equal(again["image"], first["image"])
  warnings = [r for r in caplog.records if "1.png" in r.getMessage()]
  assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
  # The last record wraps round to the first.
  assert client[3]["path"].endswith("0.png")


def test_bad_image_raise_names_the_file(tmp_path):
  client = _client_with_bad_files(tmp_path / "site", "raise")
  assert client[0]["image"][0, 0] == 0
  with pytest.raises(sources.BadImageError, match=r"1\.png"):
    client[1]
  with pytest.raises(ValueError, match=r"3\.png"):
    client[3]


def test_no_decodable_image_names_the_client(tmp_path):
  (tmp_path / "x.png").write_bytes(b"junk")
  client = sources.FolderSource("lonely", [str(tmp_path / "x.png")])
  with pytest.raises(sources.BadImageError, match="lonely"):
    client[0]


def _write_manifest(path, header, rows):
  with open(path, "w", newline="") as f:
    csv.writer(f).writerows([header, *rows])


def _images(folder, n):
  folder.mkdir(parents=True)
  for i in range(n):
    Image.fromarray(np.full((5, 7), i, np.uint8)).save(folder / f"{i}.png")
  return [f"{folder.name}/{i}.png" for i in range(n)]


def test_manifest_clients_group_probes_and_extras(tmp_path):
  names = _images(tmp_path / "img", 5)
  _write_manifest(
    tmp_path / "m.csv",
    ["image", "client", "probe", "label"],
    [
      [names[0], "north", "linear", "benign"],
      [names[1], "south", "convex", "normal"],
      [names[2], "north", "linear", "malignant"],
      [names[3], "south", "", "benign"],
      [names[4], "north", "linear", "normal"],
    ],
  )
  north, south = sources.manifest_clients(
    tmp_path / "m.csv", default_probe="linear", extra_columns=("label",)
  )
  assert (north.name, len(north), north.probe) == ("north", 3, "linear")
  # An empty probe cell takes the default: south has both probes.
  assert (south.name, len(south), south.probe) == ("south", 2, "")
  assert [south[i]["probe"] for i in range(2)] == ["convex", "linear"]
  record = north[1]
  assert record["image"][0, 0] == 2 and record["label"] == "malignant"
  assert record["path"] == str(tmp_path / "img" / "2.png")


def test_manifest_without_client_column_is_one_client(tmp_path):
  names = _images(tmp_path / "img", 3)
  _write_manifest(tmp_path / "scans.csv", ["file"], [[n] for n in names])
  (client,) = sources.manifest_clients(
    tmp_path / "scans.csv", image_column="file", default_probe="convex"
  )
  assert (client.name, len(client), client.probe) == ("scans", 3, "convex")
  assert client[2]["image"][0, 0] == 2 and client[2]["probe"] == "convex"
  assert "label" not in client[0]


def test_manifest_errors_name_the_problem(tmp_path):
  names = _images(tmp_path / "img", 2)
  _write_manifest(tmp_path / "m.csv", ["path", "site"], [[n, "a"] for n in names])
  with pytest.raises(ValueError, match=r"m\.csv.*'image'.*\['path', 'site'\]"):
    sources.manifest_clients(tmp_path / "m.csv")
  rows = [[n] for n in names] + [
    ["img/gone_1.png"],
    ["img/gone_2.png"],
    ["img/gone_3.png"],
    ["gone_4.png"],
  ]
  _write_manifest(tmp_path / "holes.csv", ["image"], rows)
  with pytest.raises(FileNotFoundError, match=r"holes\.csv") as info:
    sources.manifest_clients(tmp_path / "holes.csv")
  message = str(info.value)
  assert "4 of 6" in message and "gone_3.png" in message and "gone_4.png" not in message


def test_pooled_concatenates(tmp_path):
  a = sources.PhantomSource("a", "liver", "convex", 3, 32, seed=0)
  b = sources.FolderSource(
    "b", [str(tmp_path / p) for p in _images(tmp_path / "img", 2)], probe="convex"
  )
  pool = sources.PooledSource([a, b])
  assert (pool.name, len(pool), pool.probe) == ("pooled", 5, "convex")
  _assert_same_record(pool[2], a[2])
  assert pool[4]["image"][0, 0] == 1
  with pytest.raises(IndexError):
    pool[5]
  c = sources.PhantomSource("c", "thyroid", "linear", 1, 32, seed=0)
  assert sources.PooledSource([a, c], name="all").probe == ""


@pytest.mark.parametrize("dataset", ["busi_cls256", "hc18"])
def test_real_manifests_load(real_us, dataset):
  manifest = real_us / dataset / "labels.csv"
  with open(manifest, newline="") as f:
    rows = list(csv.DictReader(f))
  (client,) = sources.manifest_clients(manifest, extra_columns=("image_mode",))
  assert len(client) == len(rows)
  for i in (0, len(rows) - 1):
    record = client[i]
    want = (int(rows[i]["height"]), int(rows[i]["width"]))
    assert record["image"].dtype == np.uint8 and record["image"].shape[:2] == want
    assert record["image"].ndim == (3 if rows[i]["image_mode"] == "RGB" else 2)
    assert record["path"].endswith(rows[i]["image"])
