"""A real colour image collection as class folders: Noto emoji from Debian's ruby-tanuki-emoji.

    .venv/bin/python scripts/emoji_data.py --out .cache/emoji [--package-root DIR]

Debian's ``ruby-tanuki-emoji`` (0.6.0, Apache-2.0 art from Google's Noto emoji) ships 1794 RGBA
PNGs (72x72 emoji, 128x128 country flags) and Unicode's ``emoji-test.txt``, which puts every
emoji in a group. This script copies each picture into ``OUT/<class>/`` by its group, drops
skin-tone variants (near duplicates of the base emoji) and the "Component" group, and merges
small groups into seven classes (``CLASSES``). ``make colour-data`` fetches the package with
``apt-get download`` (no root needed) and runs this; nothing is downloaded at run time.
"""

from __future__ import annotations

import argparse
import re
import shutil
from collections import Counter
from pathlib import Path

GEM = "usr/share/rubygems-integration/all/gems/tanuki_emoji-0.6.0"
CLASSES = {
    "Smileys & Emotion": "smileys-people",
    "People & Body": "smileys-people",
    "Animals & Nature": "animals-food",
    "Food & Drink": "animals-food",
    "Travel & Places": "travel-places",
    "Activities": "activities",
    "Objects": "objects",
    "Symbols": "symbols",
    "Flags": "flags",
}
SKIN_TONES = {"1f3fb", "1f3fc", "1f3fd", "1f3fe", "1f3ff"}
_LINE = re.compile(r"^([0-9A-F ]+?)\s*;\s*(fully-qualified|component|minimally-qualified)")


def groups(emoji_test: Path) -> dict[str, str]:
    """``{"1f600": "Smileys & Emotion", "1f468_200d_1f469": ...}`` keyed like the file names
    (lower-case code points joined by ``_``, variation selector FE0F dropped)."""
    out: dict[str, str] = {}
    group = ""
    for line in emoji_test.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
            continue
        match = _LINE.match(line)
        if match:
            points = [p.lower() for p in match.group(1).split() if p.lower() != "fe0f"]
            out.setdefault("_".join(points), group)
    return out


def class_of(path: Path, by_key: dict[str, str]) -> str | None:
    """The class folder of one picture, or None to leave it out."""
    if re.fullmatch(r"[A-Z]{2}", path.stem):  # country flags: AC.png ... ZW.png
        return "flags"
    key = path.stem.removeprefix("emoji_u")
    if SKIN_TONES & set(key.split("_")):
        return None
    return CLASSES.get(by_key.get(key, ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="the class folders (made new)")
    p.add_argument(
        "--package-root",
        type=Path,
        default=Path("/"),
        help="where the package's files are (/ when installed, else its dpkg-deb -x folder)",
    )
    args = p.parse_args()
    gem = args.package_root / GEM
    pictures = gem / "app/assets/images/tanuki_emoji"
    if not pictures.is_dir():
        raise SystemExit(
            f"{pictures} not found: run `make colour-data` (or apt-get install ruby-tanuki-emoji)"
        )
    by_key = groups(gem / "vendor/unicode/emoji-test.txt")
    if args.out.exists():
        shutil.rmtree(args.out)
    counts: Counter[str] = Counter()
    for png in sorted(pictures.glob("*.png")):
        cls = class_of(png, by_key)
        if cls is None:
            counts["(left out)"] += 1
            continue
        (args.out / cls).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, args.out / cls / png.name)
        counts[cls] += 1
    for name, n in sorted(counts.items()):
        print(f"{name}: {n}")
    print(f"{sum(v for k, v in counts.items() if k != '(left out)')} pictures in {args.out}")


if __name__ == "__main__":
    main()
