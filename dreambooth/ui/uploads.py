"""Photo sets: the subject photos a user uploads, stored safely and checked before anything trains.

An upload is untrusted bytes. We limit the count, the bytes and the pixels; we store each file
under a generated name (the browser's file name is only shown, never used as a path); and we keep
only what Pillow verifies and fully decodes as an image. Nothing uploaded is ever unpickled: the
only reader is Pillow, and only image formats it registers are accepted.

Every change of a set runs under that set's lock and ends by rewriting set.json atomically, so
parallel uploads cannot lose each other or pass the photo limit; set.json is the truth, and a job
copies exactly the photos it lists.
"""
from __future__ import annotations

import json
import re
import secrets
import shutil
import threading
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from dreambooth.atomic import replace_file, temporary_name, write_json
from dreambooth.data.decode import DEFAULT_MAX_PIXELS
from dreambooth.errors import BadRequest, NotFound

MAX_FILES = 10  # the method wants 3-10 photos; more is refused, not silently dropped
MAX_BYTES = 25 * 1024 * 1024  # per file; a phone photo is 2-8 MB
# per file, checked from the header before decoding (decompression bombs); the training check's limit,
# so every photo the page accepts also trains
MAX_PIXELS = DEFAULT_MAX_PIXELS
THUMB_SIZE = 256
ID_PATTERN = re.compile(r"^[0-9a-f]{12}$")
# Pillow format name -> the suffix we store it under (suffix chosen by content, never by the upload).
SUFFIXES = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "GIF": ".gif", "TIFF": ".tif",
            "MPO": ".jpg"}


class UploadRejected(BadRequest):
    """An uploaded file cannot be used; the message says why and is shown to the user."""


@dataclass
class Photo:
    id: str
    original_name: str  # display only
    stored_name: str  # generated, inside the set's images/ folder
    width: int
    height: int
    exif_rotated: bool


@dataclass
class PhotoSet:
    id: str
    photos: list[Photo] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)  # {"name", "message"}, newest last


def new_id() -> str:
    """Random, unguessable, path-safe id (also used for jobs)."""
    return secrets.token_hex(6)


def display_name(name: str) -> str:
    """The upload's name, cut to its last path part and 80 printable characters, for display only."""
    base = re.split(r"[\\/]", name or "")[-1]
    cleaned = "".join(ch for ch in base if ch.isprintable())[:80]
    return cleaned or "unnamed"


class PhotoStore:
    """Photo sets under `root/<set id>/`: images/, thumbs/ and set.json."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()

    def lock(self, set_id: str) -> threading.Lock:
        """The lock of one set: held while its set.json is read, changed and written back."""
        self.folder(set_id)  # checks the id
        with self._locks_lock:
            return self._locks.setdefault(set_id, threading.Lock())

    def create(self) -> PhotoSet:
        photo_set = PhotoSet(new_id())
        self._save(photo_set)
        return photo_set

    def folder(self, set_id: str) -> Path:
        if not ID_PATTERN.match(set_id or ""):
            raise NotFound("no such photo set")
        return self.root / set_id

    def images_dir(self, set_id: str) -> Path:
        return self.folder(set_id) / "images"

    def get(self, set_id: str) -> PhotoSet:
        path = self.folder(set_id) / "set.json"
        if not path.exists():
            raise NotFound("no such photo set")
        data = json.loads(path.read_text())
        return PhotoSet(data["id"], [Photo(**p) for p in data["photos"]], data.get("rejected", []))

    def add(self, set_id: str, name: str, data: bytes) -> Photo:
        """Validate and store one upload; on rejection remember why and raise `UploadRejected`.

        The slow checks run outside the lock on a private file; the count is checked again, and the
        photo moved in and listed, under the lock.
        """
        shown = display_name(name)
        try:
            self._check_room(self.get(set_id))
            incoming, fmt, upright, rotated = self._verify(set_id, data)
        except UploadRejected as rejected:
            self.reject(set_id, shown, str(rejected))
            raise
        try:
            with self.lock(set_id):
                photo_set = self.get(set_id)
                try:
                    self._check_room(photo_set)
                except UploadRejected as rejected:
                    photo_set.rejected.append({"name": shown, "message": str(rejected)})
                    self._save(photo_set)
                    raise
                photo = self._store(photo_set, incoming, shown, fmt, upright, rotated)
                photo_set.photos.append(photo)
                self._save(photo_set)
                return photo
        finally:
            incoming.unlink(missing_ok=True)

    def remove(self, set_id: str, photo_id: str) -> None:
        with self.lock(set_id):
            photo_set = self.get(set_id)
            for photo in [p for p in photo_set.photos if p.id == photo_id]:
                (self.images_dir(set_id) / photo.stored_name).unlink(missing_ok=True)
                (self.folder(set_id) / "thumbs" / f"{photo.id}.jpg").unlink(missing_ok=True)
                photo_set.photos.remove(photo)
            self._save(photo_set)

    def reject(self, set_id: str, name: str, message: str) -> None:
        """Remember a refused file, so the page can say why."""
        with self.lock(set_id):
            photo_set = self.get(set_id)
            photo_set.rejected.append({"name": display_name(name), "message": message})
            self._save(photo_set)

    def clear_rejected(self, set_id: str) -> None:
        with self.lock(set_id):
            photo_set = self.get(set_id)
            photo_set.rejected = []
            self._save(photo_set)

    def thumb(self, set_id: str, photo_id: str) -> Path:
        if not ID_PATTERN.match(photo_id or ""):
            raise NotFound("no such photo")
        path = self.folder(set_id) / "thumbs" / f"{photo_id}.jpg"
        if not path.is_file():
            raise NotFound("no such photo")
        return path

    def copy_images(self, set_id: str, dest: Path) -> PhotoSet:
        """Freeze the set for a job: exactly the photos set.json lists, as they are now."""
        with self.lock(set_id):
            photo_set = self.get(set_id)
            dest.mkdir(parents=True, exist_ok=True)
            for photo in photo_set.photos:
                shutil.copy2(self.images_dir(set_id) / photo.stored_name, dest / photo.stored_name)
            return photo_set

    @staticmethod
    def _check_room(photo_set: PhotoSet) -> None:
        if len(photo_set.photos) >= MAX_FILES:
            raise UploadRejected(f"was not added: the set already has {MAX_FILES} photos, the most DreamBooth "
                                 "needs; remove one first")

    def _verify(self, set_id: str, data: bytes) -> tuple[Path, str, Image.Image, bool]:
        """Write the bytes to a private file and check them; the caller removes the file."""
        if len(data) > MAX_BYTES:
            raise UploadRejected(f"is {len(data) / 2**20:.1f} MB, over the {MAX_BYTES // 2**20} MB limit; "
                                 "export a smaller JPEG")
        if not data:
            raise UploadRejected("is empty")
        folder = self.folder(set_id)
        folder.mkdir(parents=True, exist_ok=True)
        incoming = temporary_name(folder / "incoming")  # private until checked, then renamed into images/
        incoming.write_bytes(data)
        try:
            return (incoming, *verify_image(incoming))
        except BaseException:
            incoming.unlink(missing_ok=True)
            raise

    def _store(self, photo_set: PhotoSet, incoming: Path, shown: str, fmt: str, upright: Image.Image,
               rotated: bool) -> Photo:
        photo_id = new_id()
        folder = self.folder(photo_set.id)
        (folder / "images").mkdir(parents=True, exist_ok=True)
        (folder / "thumbs").mkdir(parents=True, exist_ok=True)
        stored = f"{photo_id}{SUFFIXES[fmt]}"
        write_thumb(upright, folder / "thumbs" / f"{photo_id}.jpg")
        incoming.replace(folder / "images" / stored)
        return Photo(photo_id, shown, stored, upright.width, upright.height, rotated)

    def _save(self, photo_set: PhotoSet) -> None:
        folder = self.folder(photo_set.id)
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / "set.json", asdict(photo_set))


def verify_image(path: Path) -> tuple[str, Image.Image, bool]:
    """(format, upright RGB-or-original image, EXIF-rotated?) or `UploadRejected`.

    Three gates: the header's pixel count (before any decoding), Pillow's `verify()` (structure and
    checksums), then a full decode (truncation). Formats outside `SUFFIXES` are refused.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as image:
                fmt, (width, height) = image.format, image.size
                if width * height > MAX_PIXELS:
                    raise UploadRejected(f"is {width}x{height} = {width * height:,} pixels, over the limit of "
                                         f"{MAX_PIXELS:,} (possible decompression bomb); downscale it")
                image.verify()
            with Image.open(path) as image:
                image.load()
                orientation = image.getexif().get(0x0112, 1)
                upright = ImageOps.exif_transpose(image)
        except UploadRejected:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise UploadRejected(f"has too many pixels (over {MAX_PIXELS:,}; possible decompression bomb); "
                                 "downscale it") from None
        except UnidentifiedImageError:
            raise UploadRejected("is not an image this app can read (use JPEG, PNG or WebP); refused") from None
        except (OSError, SyntaxError, EOFError, ValueError, IndexError):
            raise UploadRejected("is a damaged or truncated image file; refused") from None
    if fmt not in SUFFIXES:
        raise UploadRejected(f"is a {fmt} image; use JPEG, PNG or WebP")
    return fmt, upright, orientation in range(2, 9)


def write_thumb(image: Image.Image, path: Path) -> None:
    """An upright JPEG thumbnail, so the page shows the photo the way training will see it."""
    thumb = image.convert("RGB")
    thumb.thumbnail((THUMB_SIZE, THUMB_SIZE))
    replace_file(path, lambda tmp: thumb.save(tmp, "JPEG", quality=85))
