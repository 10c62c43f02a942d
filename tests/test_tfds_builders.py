"""TFDS builders: each reads a few tiny dummy files written in its dataset's published layout,
builds into a temporary data_dir (array_record) and is read back through tfds.data_source and
TfdsSource, the way data.source='tfds' reads it."""

import csv
import json
import math
import os

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from skimage import draw

tfds = pytest.importorskip(
  "tensorflow_datasets", reason="tensorflow_datasets is not installed (pip install '.[tfds]')"
)
pytest.importorskip("tensorflow", reason="TFDS builds need TensorFlow (pip install '.[tfds]')")

from ultrajax import configlib
from ultrajax.data import tfds as us_tfds
from ultrajax.data.tfds import camus, hc18, pocus, source


def _png(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path)


def _image(rng, h, w, channels=0):
  return rng.integers(0, 256, (h, w, channels) if channels else (h, w), dtype=np.uint8)


def _busi(root, rng):
  """Dataset_BUSI_with_GT/<label>/'<label> (<n>).png' + _mask.png (+ _mask_1.png); expected."""
  expected = {}
  for label, n, lesions in (("benign", 1, 2), ("malignant", 3, 1), ("normal", 2, 1)):
    stem = os.path.join(root, "Dataset_BUSI_with_GT", label, f"{label} ({n})")
    image = np.repeat(_image(rng, 12, 16)[..., None], 3, -1)
    _png(stem + ".png", image)
    union = np.zeros((12, 16), bool)
    for k in range(lesions):
      mask = np.zeros((12, 16), bool)
      mask[2 + 4 * k : 5 + 4 * k, 3:9] = label != "normal"
      union |= mask
      _png(
        stem + ("_mask.png" if k == 0 else f"_mask_{k}.png"),
        np.where(mask, 255, 0).astype(np.uint8),
      )
    expected[f"{label}_{n}"] = {
      "image": image,
      "mask": union,
      "label": label,
      "patient": f"{label}_{n}",
      "spacing": math.nan,
    }
  # A stray mask of another image's size, as BUSI ships one: left out with a warning.
  _png(
    os.path.join(root, "Dataset_BUSI_with_GT", "malignant", "malignant (3)_mask_1.png"),
    np.full((7, 7), 255, np.uint8),
  )
  return expected


def _hc18(root, rng):
  """training_set/<n>_HC.png + <n>_HC_Annotation.png (ellipse outline) and the pixel-size CSV."""
  expected, rows = {}, []
  for name, spacing in (("000_HC", 0.07), ("010_HC", 0.11), ("010_2HC", 0.12)):
    image = _image(rng, 24, 32)
    outline = np.zeros((24, 32), np.uint8)
    outline[draw.ellipse_perimeter(12, 16, 7, 11, shape=(24, 32))] = 255
    _png(os.path.join(root, "training_set", name + ".png"), image)
    _png(os.path.join(root, "training_set", name + "_Annotation.png"), outline)
    region = np.zeros((24, 32), bool)
    region[draw.ellipse(12, 16, 7.5, 11.5, shape=(24, 32))] = True
    rows.append(
      {"filename": name + ".png", "pixel size(mm)": spacing, "head circumference (mm)": 50.0}
    )
    expected[name] = {
      "image": image,
      "mask": region,
      "label": None,
      "patient": str(int(name[:3])),
      "spacing": spacing,
    }
  with open(os.path.join(root, "training_set_pixel_size_and_HC.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  return expected


def _fetal_planes_db(root, rng):
  """FETAL_PLANES_DB_data.csv (';'-separated, 'Train ' with its trailing space) + Images/."""
  expected, lines = {}, ["Image_name;Patient_num;Plane;Brain_plane;Operator;US_Machine;Train "]
  for name, patient, plane, train in (
    ("Patient00001_Plane1_1_of_2", "1", "Fetal brain", 1),
    ("Patient00001_Plane2_2_of_2", "1", "Maternal cervix", 1),
    ("Patient00002_Plane1_1_of_1", "2", "Other", 0),
  ):
    image = _image(rng, 10, 14)
    _png(os.path.join(root, "Images", name + ".png"), image)
    lines.append(f"{name};{patient};{plane};Not A Brain;Op. 1;Voluson E6;{train}")
    if train:
      expected[name] = {
        "image": image,
        "mask": None,
        "label": plane,
        "patient": patient,
        "spacing": math.nan,
      }
  with open(os.path.join(root, "FETAL_PLANES_DB_data.csv"), "w") as f:
    f.write("\n".join(lines) + "\n")
  return expected


def _bus_bra(root, rng):
  """bus_data.csv (ID bus_<patient>-<view>) + Images/<ID>.png + Masks/mask_<patient>-<view>.png."""
  expected, lines = {}, ["ID,Histology,Pathology,BIRADS,Device,Height,Width,Side,BBOX"]
  for key, pathology in (
    ("bus_0001-l", "benign"),
    ("bus_0001-s", "benign"),
    ("bus_0002-r", "malignant"),
  ):
    image = _image(rng, 10, 12)
    mask = np.zeros((10, 12), bool)
    mask[3:7, 2:9] = True
    _png(os.path.join(root, "Images", key + ".png"), image)
    _png(
      os.path.join(root, "Masks", "mask" + key[3:] + ".png"),
      np.where(mask, 255, 0).astype(np.uint8),
    )
    lines.append(f'{key},Fibroadenoma,{pathology},3,GE Logiq 5,10,12,left,"[2, 3, 7, 4]"')
    expected[key] = {
      "image": image,
      "mask": mask,
      "label": pathology,
      "patient": str(int(key[4:8])),
      "spacing": math.nan,
    }
  with open(os.path.join(root, "bus_data.csv"), "w") as f:
    f.write("\n".join(lines) + "\n")
  return expected


def _tn3k(root, rng):
  """tn3k/{trainval,test}-image/<n>.jpg with tn3k/{trainval,test}-mask/<n>.jpg (JPEG masks)."""
  expected = {}
  for prefix, name in (("trainval", "0000"), ("trainval", "0001"), ("test", "0000")):
    path = os.path.join(root, "tn3k", f"{prefix}-image", name + ".jpg")
    _png(path, _image(rng, 16, 16))
    mask = np.zeros((16, 16), bool)
    mask[8:16, 0:8] = True  # one JPEG block: thresholding at 128 recovers it exactly
    _png(
      os.path.join(root, "tn3k", f"{prefix}-mask", name + ".jpg"),
      np.where(mask, 255, 0).astype(np.uint8),
    )
    if prefix == "trainval":
      with Image.open(path) as img:  # the JPEG as written (lossy), decoded by PIL
        expected[name] = {
          "image": np.asarray(img.convert("L")),
          "mask": mask,
          "label": None,
          "patient": f"trainval_{name}",
          "spacing": math.nan,
        }
  return expected


def _tg3k(root, rng):
  """tg3k/thyroid-{image,mask}/<nnnn>.jpg + tg3k-trainval.json; two 'videos' of different frame
  sizes (frames 0-1 and 2), frame 1 in the val split."""
  expected = {}
  for n, (h, w), split in ((0, (16, 16), "train"), (1, (16, 16), "val"), (2, (8, 16), "train")):
    path = os.path.join(root, "tg3k", "thyroid-image", f"{n:04d}.jpg")
    _png(path, _image(rng, h, w))
    mask = np.zeros((h, w), bool)
    mask[:8, 8:16] = True
    _png(
      os.path.join(root, "tg3k", "thyroid-mask", f"{n:04d}.jpg"),
      np.where(mask, 255, 0).astype(np.uint8),
    )
    if split == "train":
      with Image.open(path) as img:
        expected[f"{n:04d}"] = {
          "image": np.asarray(img.convert("L")),
          "mask": mask,
          "label": None,
          "patient": f"video_run_{n // 2}",
          "spacing": math.nan,
        }
  with open(os.path.join(root, "tg3k", "tg3k-trainval.json"), "w") as f:
    f.write('{"train": [0, 2], "val": [1]}')
  return expected


def _ddti(root, rng):
  """<case>.xml (a <mark> with JSON polygons per image) + <case>_<k>.jpg; case 7 has two images,
  the second with two nodules."""
  expected = {}
  marks = {
    1: [[(2, 2), (10, 2), (10, 8), (2, 8)]],
    2: [[(1, 1), (5, 1), (5, 5)], [(9, 9), (14, 9), (14, 13)]],
  }
  xml = [
    '<?xml version="1.0" encoding="UTF-8"?><case><number>7</number><age>49</age><sex>F</sex>',
    "<composition>solid</composition><echogenicity>hypoechogenicity</echogenicity>",
    "<margins>well defined</margins><calcifications>non</calcifications><tirads>4a</tirads>",
    "<reportbacaf/><reporteco/>",
  ]
  for k, polygons in marks.items():
    path = os.path.join(root, f"7_{k}.jpg")
    _png(path, _image(rng, 16, 16))
    svg = json.dumps([{"points": [{"x": x, "y": y} for x, y in poly]} for poly in polygons])
    xml.append(f"<mark><image>{k}</image><svg>{svg}</svg></mark>")
    mask = np.zeros((16, 16), bool)
    for poly in polygons:  # by hand: skimage.draw.polygon takes rows (y) then columns (x)
      rr, cc = draw.polygon([y for _, y in poly], [x for x, _ in poly], shape=(16, 16))
      mask[rr, cc] = True
    with Image.open(path) as img:
      expected[f"7_{k}"] = {
        "image": np.asarray(img.convert("L")),
        "mask": mask,
        "label": None,
        "patient": "7",
        "spacing": math.nan,
      }
  with open(os.path.join(root, "7.xml"), "w") as f:
    f.write("".join(xml) + "</case>")
  return expected


def _mhd(stem, array, spacing, ndims):
  """A MetaImage as CAMUS ships it: <stem>.mhd (text header) + <stem>.raw (uint8, x fastest)."""
  os.makedirs(os.path.dirname(stem), exist_ok=True)
  h, w = array.shape
  dims, sp = f"{w} {h}", f"{spacing[0]:g} {spacing[1]:g}"
  if ndims == 3:  # CAMUS's 2-D frames come with 3-D headers of one slice
    dims, sp = dims + " 1", sp + " 1"
  with open(stem + ".mhd", "w") as f:
    f.write(
      f"ObjectType = Image\nNDims = {ndims}\nBinaryData = True\nBinaryDataByteOrderMSB = "
      f"False\nCompressedData = False\nElementSpacing = {sp}\nDimSize = {dims}\n"
      f"ElementType = MET_UCHAR\nElementDataFile = {os.path.basename(stem)}.raw\n"
    )
  array.astype(np.uint8).tofile(stem + ".raw")  # C order: columns (x) vary fastest


def _camus(root, rng):
  """training/patient<nnnn>/patient<nnnn>_{2CH,4CH}_{ED,ES}[_gt].mhd/.raw + Info_<view>.cfg;
  patient 1 with 3-D headers (one slice) and non-square pixels, patient 2 2-D and square."""
  expected = {}
  for patient, spacing, ndims in (("patient0001", (0.3, 0.15), 3), ("patient0002", (0.2, 0.2), 2)):
    folder = os.path.join(root, "training", patient)
    for view in ("2CH", "4CH"):
      os.makedirs(folder, exist_ok=True)
      with open(os.path.join(folder, f"Info_{view}.cfg"), "w") as f:
        f.write(
          f"ED: 1\nES: 12\nNbFrame: 12\nSex: F\nAge: 61\nImageQuality: "
          f"{'Good' if view == '2CH' else 'Poor'}\nLVedv: 90.1\nLVesv: 40.2\nLVef: 55.3\n"
        )
      for phase in ("ED", "ES"):
        image = _image(rng, 10, 12)
        labels = rng.integers(0, 4, (10, 12)).astype(np.uint8)
        _mhd(os.path.join(folder, f"{patient}_{view}_{phase}"), image, spacing, ndims)
        _mhd(os.path.join(folder, f"{patient}_{view}_{phase}_gt"), labels, spacing, ndims)
        expected[f"{patient}_{view}_{phase}"] = {
          "image": image,
          "mask": labels == 1,
          "structures": labels,
          "label": None,
          "patient": patient,
          "spacing": math.nan if spacing[0] != spacing[1] else spacing[0],
          "row_col": spacing[::-1],
          "quality": "Good" if view == "2CH" else "Poor",
        }
  return expected


def _pocus(root, rng):
  """data/pocus_images/{convex,linear}/<Prefix>-<name>.png and data/pocus_videos/...: a 12-frame
  GIF (frames 0 and 10 sampled), an undecodable .mp4 and a file with no class prefix (left out)."""
  expected = {}
  for probe, name, label in (
    ("convex", "Cov-atlas.png", "covid"),
    ("linear", "Reg-grep.png", "regular"),
  ):
    image = _image(rng, 8, 10, 3)
    _png(os.path.join(root, "data", "pocus_images", probe, name), image)
    expected[name] = {
      "image": image,
      "mask": None,
      "label": label,
      "patient": name[:-4],
      "spacing": math.nan,
      "probe": probe,
    }
  _png(
    os.path.join(root, "data", "pocus_images", "convex", "Butterfly-logo.png"), _image(rng, 4, 4)
  )
  frames = [_image(rng, 8, 10) for _ in range(12)]
  video = os.path.join(root, "data", "pocus_videos", "convex", "Pneu-loop.gif")
  os.makedirs(os.path.dirname(video), exist_ok=True)
  Image.fromarray(frames[0]).save(
    video,
    save_all=True,
    duration=50,
    loop=0,
    append_images=[Image.fromarray(f) for f in frames[1:]],
  )
  for k in (0, 10):
    expected[f"Pneu-loop.gif#{k}"] = {
      "image": np.repeat(frames[k][..., None], 3, -1),
      "mask": None,
      "label": "pneumonia",
      "patient": "Pneu-loop",
      "spacing": math.nan,
      "probe": "convex",
    }
  os.makedirs(os.path.join(root, "data", "pocus_videos", "linear"))
  with open(os.path.join(root, "data", "pocus_videos", "linear", "Vir-clip.mp4"), "wb") as f:
    f.write(b"not a video")
  return expected


def _mmotu(root, rng):
  """OTU_2d/images/<n>.JPG, annotations/<n>_binary.PNG (0/255 or 0/1) or only the coloured
  <n>.PNG, train_cls.txt / val_cls.txt ('<n>.JPG  <class>', two spaces)."""
  expected = {}
  for n, class_id, mask_file in ((1, 0, "_binary"), (2, 6, ""), (3, 7, "_binary")):
    path = os.path.join(root, "OTU_2d", "images", f"{n}.JPG")
    _png(path, _image(rng, 16, 16, 3))  # a JPEG (PIL goes by the extension, any case)
    mask = np.zeros((16, 16), bool)
    mask[4:12, 2:10] = True
    if mask_file:  # 3's binary mask is stored as 0/1
      values = np.where(mask, 255 if n == 1 else 1, 0).astype(np.uint8)
    else:  # the coloured class mask: class 6 (normal ovary) is (64, 64, 64)
      values = np.zeros((16, 16, 3), np.uint8)
      values[mask] = (64, 64, 64)
    _png(os.path.join(root, "OTU_2d", "annotations", f"{n}{mask_file}.PNG"), values)
    if n < 3:
      with Image.open(path) as img:
        expected[str(n)] = {
          "image": np.asarray(img.convert("RGB")),
          "mask": mask,
          "label": us_tfds.Mmotu.CLASSES[class_id],
          "patient": str(n),
          "spacing": math.nan,
        }
  with open(os.path.join(root, "OTU_2d", "train_cls.txt"), "w") as f:
    f.write("1.JPG  0\n2.JPG  6\n")
  with open(os.path.join(root, "OTU_2d", "val_cls.txt"), "w") as f:
    f.write("3.JPG  7\n")
  return expected


LAYOUTS = {
  "busi": _busi,
  "bus_bra": _bus_bra,
  "camus": _camus,
  "ddti": _ddti,
  "hc18": _hc18,
  "fetal_planes_db": _fetal_planes_db,
  "mmotu": _mmotu,
  "pocus": _pocus,
  "tg3k": _tg3k,
  "tn3k": _tn3k,
}


def test_every_builder_has_a_dummy_layout():
  assert sorted(LAYOUTS) == sorted(us_tfds.BUILDERS)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """{name: expected records}, data_dir: every builder built once from its dummy layout."""
  root = tmp_path_factory.mktemp("tfds")
  rng = np.random.default_rng(0)
  expected = {}
  for name, layout in LAYOUTS.items():
    expected[name] = layout(str(root / "manual" / name), rng)
    us_tfds.build(name, str(root / "manual" / name), str(root / "data"))
  return expected, str(root / "data")


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_builder_reads_the_published_layout(name, built):
  expected, data_dir = built[0][name], built[1]
  client = source.TfdsSource(name, data_dir, "train")
  assert len(client) == len(expected)
  seen = set()
  for i in range(len(client)):
    record = client[i]
    key = os.path.basename(record["path"])  # pocus: '<video>#<frame>' for video frames
    key = key if name == "pocus" else os.path.splitext(key)[0]
    key = {"busi": lambda k: k.replace(" (", "_").rstrip(")")}.get(name, lambda k: k)(key)
    want = expected[key]
    seen.add(key)
    np.testing.assert_array_equal(record["image"], want["image"])
    assert record["patient_id"] == want["patient"]
    assert record.get("label") == want["label"]
    assert record["probe"] == want.get("probe", record["probe"])
    if math.isnan(want["spacing"]):
      assert record["pixel_size_mm"] == ""
    else:
      assert float(record["pixel_size_mm"]) == pytest.approx(want["spacing"])
    if want["mask"] is None:
      assert "lesion_mask" not in record
    elif name == "hc18":  # the filled outline against skimage's filled ellipse
      inter = np.logical_and(record["lesion_mask"], want["mask"]).sum()
      assert inter / np.logical_or(record["lesion_mask"], want["mask"]).sum() > 0.9
    else:
      np.testing.assert_array_equal(record["lesion_mask"], want["mask"])
  assert seen == set(expected)


@pytest.mark.parametrize("orientation", [0.0, 0.6])
def test_hc18_outline_cut_by_the_border_is_fitted(orientation):
  """An outline whose lower third lies outside the image gets the region of the whole ellipse."""
  whole = np.zeros((60, 40), bool)
  whole[draw.ellipse_perimeter(30, 20, 12, 8, orientation=orientation, shape=(60, 40))] = True
  want = ndimage.binary_fill_holes(whole)[:40]
  got = hc18.fill_ellipse(whole[:40])
  assert np.logical_and(got, want).sum() / np.logical_or(got, want).sum() > 0.95


def test_unprepared_dataset_says_how_to_build_it(built, tmp_path):
  with pytest.raises(configlib.DataError, match="python -m ultrajax.data.tfds --name=busi"):
    source.TfdsSource("busi", str(tmp_path))
  with pytest.raises(configlib.DataError, match="split 'validation'"):
    source.TfdsSource("busi", built[1], "validation")


def test_missing_manual_dir_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="Dataset_BUSI_with_GT"):
    us_tfds.build("busi", str(tmp_path), str(tmp_path / "data"))


def test_pretraining_clients_from_tfds(built):
  """data.source='tfds' with two datasets: two clients through the pretraining job's sources."""
  from ultrajax import pretrain_checks
  from ultrajax.data import clients as clients_lib

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = configlib.load_config_module(
    os.path.join(repo, "configs", "pretrain_fed.py")
  ).get_config("smoke")
  config.data.update(source="tfds", tfds_name="busi, hc18", tfds_data_dir=built[1])
  config.ultramim.smat = False  # (SMAT partners would add records)
  pretrain_checks.validate(config)
  clients = clients_lib.client_sources(config)
  assert [c.name for c in clients] == ["busi", "hc18"]
  assert [len(c) for c in clients] == [len(built[0]["busi"]), len(built[0]["hc18"])]
  config.data.tfds_name = " , "
  with pytest.raises(configlib.ConfigError, match="config.data.tfds_name"):
    pretrain_checks.validate(config)


def test_fine_tuning_tasks_from_tfds(built):
  """tfds_task: labels (sorted names), masks resized, patient groups, spacing in mm per input pixel."""
  expected, data_dir = built
  cls = source.tfds_task("busi", data_dir, "train", "cls", 8)
  assert cls.class_names == ("benign", "malignant", "normal")
  assert sorted(cls.class_names[t] for t in cls.targets) == ["benign", "malignant", "normal"]
  assert sorted(cls.groups) == sorted(expected["busi"]) and cls.spacing is None
  assert cls.images.shape == (3, 8, 8, 3)
  seg = source.tfds_task("hc18", data_dir, "train", "seg", 16)
  assert seg.targets.shape == (3, 16, 16) and set(np.unique(seg.targets)) == {0, 1}
  assert sorted(seg.groups) == ["0", "10", "10"]
  # 24 x 32 images resized to 16 x 16: mm per input pixel = pixel size * (24 / 16, 32 / 16).
  np.testing.assert_allclose(
    seg.spacing[np.argsort(seg.spacing[:, 0])],
    [(s * 24 / 16, s * 32 / 16) for s in (0.07, 0.11, 0.12)],
    rtol=1e-6,
  )
  with pytest.raises(configlib.ConfigError, match="no image labels"):
    source.tfds_task("hc18", data_dir, "train", "cls", 8)


def test_published_second_splits(built):
  """The val / test splits the publishers ship next to train."""
  data_dir = built[1]
  val = source.TfdsSource("tg3k", data_dir, "validation")
  assert len(val) == 1 and val[0]["patient_id"] == "video_run_0"
  assert len(source.TfdsSource("tn3k", data_dir, "test")) == 1
  test = source.TfdsSource("fetal_planes_db", data_dir, "test")
  assert [test[0]["patient_id"], test[0]["label"]] == ["2", "Other"]
  val = source.TfdsSource("mmotu", data_dir, "validation")
  assert len(val) == 1 and val[0]["label"] == "high_grade_serous_cystadenocarcinoma"
  assert val[0]["lesion_mask"].sum() == 64  # a 0/1 binary mask is read as foreground too


def test_camus_class_ids_spacing_and_info(built):
  """CAMUS keeps the 0..3 class ids, (row, col) spacing from ElementSpacing (x first) and the
  Info_<view>.cfg image quality next to the binary LV mask that TfdsSource reads."""
  expected, data_dir = built[0]["camus"], built[1]
  ds = tfds.data_source("camus", split="train", data_dir=data_dir, download=False)
  assert len(ds) == len(expected) == 8
  for i in range(len(ds)):
    ex = ds[i]
    key = os.path.splitext(os.path.basename(ex["file_name"].decode()))[0]
    want = expected[key]
    np.testing.assert_array_equal(ex["structures"][..., 0], want["structures"])
    np.testing.assert_allclose(ex["pixel_spacing_mm"], want["row_col"], rtol=1e-6)
    assert ex["image_quality"].decode() == want["quality"]
    assert [ex["view"].decode(), ex["phase"].decode()] == key.split("_")[1:]


def test_mhd_reader_matches_simpleitk(tmp_path):
  """read_mhd against SimpleITK on a 16-bit big-endian 3-D MetaImage written by SimpleITK."""
  sitk = pytest.importorskip("SimpleITK")
  array = np.random.default_rng(1).integers(0, 60000, (2, 3, 4)).astype(np.uint16)
  image = sitk.GetImageFromArray(array)
  image.SetSpacing((0.5, 0.25, 2.0))
  sitk.WriteImage(image, str(tmp_path / "x.mhd"))
  got, spacing = camus.read_mhd(str(tmp_path / "x.mhd"))
  np.testing.assert_array_equal(
    got, sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "x.mhd")))
  )
  assert spacing == (0.5, 0.25, 2.0)
  (tmp_path / "x.raw").write_bytes(b"\0" * 10)
  with pytest.raises(ValueError, match="x.raw holds 5 values"):
    camus.read_mhd(str(tmp_path / "x.mhd"))


def test_pocus_without_imageio_reads_images_only(tmp_path, monkeypatch):
  _pocus(str(tmp_path), np.random.default_rng(2))
  monkeypatch.setitem(__import__("sys").modules, "imageio.v3", None)
  keys = [k for k, _ in us_tfds.Pocus._generate_examples(us_tfds.Pocus, str(tmp_path), "train")]
  assert sorted(keys) == [
    "data/pocus_images/convex/Cov-atlas.png",
    "data/pocus_images/linear/Reg-grep.png",
  ]
  assert [pocus.label_of(n) for n in ("Cov-a.gif", "pneu_b.mp4", "REG.png", "Vir-c", "x.png")] == [
    "covid",
    "pneumonia",
    "regular",
    "viral",
    None,
  ]
