"""Procedural captioned videos: coloured shapes moving in described directions, sizes and speeds, as real mp4 files.

    python -m hyvideo_jax.data.synthetic --config=configs/demo.py --out=/tmp/demo_videos
    # → /tmp/demo_videos/video-00000.mp4, ..., captions.jsonl ({"video": "video-00000.mp4", "caption": "..."})

Each video shows one shape (circle, square or triangle) of one colour on a plain background, crossing the frame
in one direction; its caption says what is seen, e.g. "a small red circle moving left quickly on a black
background". Everything follows from the seed, so the demo dataset is the same on every machine and needs no
download. Videos are H.264 (yuv420p, PyAV), so they go through the same decoder as real videos.

A split by content: `exclude` lists (shape, colour, direction) combinations that never appear, `combinations` the
only ones that do (video i shows combinations[i % n]), so a model trained on one side can be asked for the other:
captions whose words it has seen, never together.
"""

import dataclasses
import json
from typing import Any, Mapping

import numpy as np

from hyvideo_jax.config_fields import from_fields

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (240, 220, 40),
           "white": (240, 240, 240), "purple": (150, 60, 200)}
BACKGROUNDS = {"black": (10, 10, 10), "gray": (110, 110, 110)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.18, "large": 0.36, "huge": 0.6}   # shape diameter as a fraction of the frame's shorter side
SPEEDS = {"slowly": 0.5, "quickly": 1.0}         # fraction of the path covered over the clip
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
CAPTIONS = "captions.jsonl"
Combination = tuple[str, str, str]               # (shape, colour, direction)


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """The `config.data.synthetic` section: how many videos, their frame sizes ((height, width) cycled), lengths
    in frames (cycled) and frame rate; which (shape, colour, direction) combinations are left out (`exclude`) or
    are the only ones shown (`combinations`, cycled; empty: any); and the shape sizes, speeds and backgrounds drawn
    from (`shape_sizes`, `speeds`, `backgrounds`: names of SIZES, SPEEDS, BACKGROUNDS; empty: all). Captions name
    every attribute whichever are drawn from."""
    num_videos: int = 16
    sizes: tuple[tuple[int, int], ...] = ((64, 64), (48, 80))
    frames: tuple[int, ...] = (17, 25)
    fps: float = 8.0
    seed: int = 0
    exclude: tuple[Combination, ...] = ()
    combinations: tuple[Combination, ...] = ()
    shape_sizes: tuple[str, ...] = ()
    speeds: tuple[str, ...] = ()
    backgrounds: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "sizes", tuple(tuple(int(v) for v in s) for s in self.sizes))
        object.__setattr__(self, "frames", tuple(int(f) for f in self.frames))
        for field in ("exclude", "combinations"):
            object.__setattr__(self, field, tuple(tuple(str(v) for v in c) for c in getattr(self, field)))
        for field in ("shape_sizes", "speeds", "backgrounds"):
            object.__setattr__(self, field, tuple(str(v) for v in getattr(self, field)))
        self.validate()

    def validate(self):
        def fail(field, msg):
            raise ValueError(f"data.synthetic.{field}: {msg}")
        if self.num_videos < 1:
            fail("num_videos", f"must be positive, got {self.num_videos}")
        if not self.sizes or any(len(s) != 2 or min(s) < 16 or s[0] % 2 or s[1] % 2 for s in self.sizes):
            fail("sizes", f"must be (height, width) pairs, even and at least 16 (H.264 yuv420p), got {self.sizes}")
        if not self.frames or min(self.frames) < 1:
            fail("frames", f"must be positive frame counts, got {self.frames}")
        if not self.fps > 0:
            fail("fps", f"must be positive, got {self.fps}")
        for field in ("exclude", "combinations"):
            for combination in getattr(self, field):
                if (len(combination) != 3 or combination[0] not in SHAPES or combination[1] not in COLOURS
                        or combination[2] not in DIRECTIONS):
                    fail(field, f"each entry must be (shape, colour, direction) with shape in {SHAPES}, colour in "
                         f"{tuple(COLOURS)} and direction in {tuple(DIRECTIONS)}, got {combination}")
        if len(set(self.exclude)) == len(SHAPES) * len(COLOURS) * len(DIRECTIONS):
            fail("exclude", "leaves no (shape, colour, direction) combination to show")
        for field, names in (("shape_sizes", SIZES), ("speeds", SPEEDS), ("backgrounds", BACKGROUNDS)):
            unknown = [v for v in getattr(self, field) if v not in names]
            if unknown:
                fail(field, f"{unknown} are not among {tuple(names)}")
        excluded = set(self.exclude) & set(self.combinations)
        if excluded:
            fail("combinations", f"{sorted(excluded)} are also in data.synthetic.exclude")

    @classmethod
    def from_config(cls, config: "SyntheticConfig | Mapping[str, Any]") -> "SyntheticConfig":
        return from_fields(cls, config, "data.synthetic")


@dataclasses.dataclass(frozen=True)
class Scene:
    """What one video shows; `caption` describes it."""
    shape: str
    colour: str
    size: str
    direction: str
    speed: str
    background: str

    @property
    def combination(self) -> Combination:
        return self.shape, self.colour, self.direction

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} moving {self.direction} {self.speed} on a " \
               f"{self.background} background"

    @classmethod
    def from_caption(cls, caption: str) -> "Scene":
        """The scene a caption describes (the inverse of `caption`); ValueError for any other text."""
        words = caption.split()
        if (len(words) != 11 or words[0] != "a" or words[4] != "moving" or words[7:9] != ["on", "a"]
                or words[10] != "background"):
            raise ValueError(f"not a synthetic caption: {caption!r}")
        scene = cls(shape=words[3], colour=words[2], size=words[1], direction=words[5], speed=words[6],
                    background=words[9])
        for value, names in ((scene.shape, SHAPES), (scene.colour, COLOURS), (scene.size, SIZES),
                             (scene.direction, DIRECTIONS), (scene.speed, SPEEDS), (scene.background, BACKGROUNDS)):
            if value not in names:
                raise ValueError(f"not a synthetic caption: {caption!r} ({value!r} is not among {tuple(names)})")
        return scene


def vocabulary() -> tuple[str, ...]:
    """Every word a caption can use, once each, in a fixed order (e.g. whole-word tokens for the demo tokenizer)."""
    words = ["a", *SIZES, *COLOURS, *SHAPES, "moving", *DIRECTIONS, *SPEEDS, "on", *BACKGROUNDS, "background"]
    return tuple(dict.fromkeys(words))


def random_scene(rng: np.random.Generator, exclude=(), combination: Combination | None = None, shape_sizes=(),
                 speeds=(), backgrounds=()) -> Scene:
    """Every attribute drawn uniformly (sizes, speeds and backgrounds from the given names, or all), redrawn while
    (shape, colour, direction) is in `exclude`; `combination` fixes those three instead."""
    def pick(options):
        return list(options)[int(rng.integers(len(options)))]
    while True:
        scene = Scene(pick(SHAPES), pick(COLOURS), pick(shape_sizes or SIZES), pick(DIRECTIONS),
                      pick(speeds or SPEEDS), pick(backgrounds or BACKGROUNDS))
        if combination is not None:
            return dataclasses.replace(scene, shape=combination[0], colour=combination[1], direction=combination[2])
        if scene.combination not in exclude:
            return scene


def scene_of(config: SyntheticConfig, index: int) -> tuple[Scene, float]:
    """Video `index`'s scene and its offset across the direction of motion, from (seed, index) alone."""
    rng = np.random.default_rng([config.seed, index])
    combination = config.combinations[index % len(config.combinations)] if config.combinations else None
    scene = random_scene(rng, set(config.exclude), combination, config.shape_sizes, config.speeds, config.backgrounds)
    return scene, float(rng.uniform(-0.3, 0.3))


def render(scene: Scene, frames: int, height: int, width: int, offset: float = 0.0, still_at: float = 0.0
           ) -> np.ndarray:
    """uint8 video [frames, height, width, 3] of `scene`. The shape's centre moves along the direction of motion
    through the middle of the frame (shifted across it by `offset` in [-0.5, 0.5]), covering SPEEDS[speed] of
    the way from one edge to the other; a single frame shows it at `still_at` (0 to 1) of that way."""
    diameter = SIZES[scene.size] * min(height, width)
    dy, dx = DIRECTIONS[scene.direction]
    travel = SPEEDS[scene.speed]
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    video = np.empty((frames, height, width, 3), np.uint8)
    video[:] = BACKGROUNDS[scene.background]
    for t in range(frames):
        # progress from -travel/2 to +travel/2 of the extent along the motion axis, centred on the frame
        progress = ((t / (frames - 1) if frames > 1 else still_at) - 0.5) * travel
        cy = height / 2 + dy * progress * (height - diameter) + (dx != 0) * offset * (height - diameter)
        cx = width / 2 + dx * progress * (width - diameter) + (dy != 0) * offset * (width - diameter)
        r = diameter / 2
        if scene.shape == "circle":
            inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2
        elif scene.shape == "square":
            inside = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)
        else:  # an upward triangle: apex at the top, base at the bottom of the bounding square
            rel_y = (yy - (cy - r)) / (2 * r)
            inside = (rel_y >= 0) & (rel_y <= 1) & (np.abs(xx - cx) <= rel_y * r)
        video[t][inside] = COLOURS[scene.colour]
    return video


def write_mp4(path: str, video: np.ndarray, fps: float):
    """Encode uint8 video [T, H, W, 3] (H, W even) as H.264 yuv420p at `fps`; `path` may be a `gs://` URL."""
    import fractions
    import io

    import av
    from etils import epath

    if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
        raise ValueError(f"video must be uint8 [T, H, W, 3], got {video.dtype} {video.shape}")
    if video.shape[1] % 2 or video.shape[2] % 2:
        raise ValueError(f"H.264 (yuv420p) needs an even height and width, got {video.shape[1]}x{video.shape[2]}")
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fractions.Fraction(fps).limit_denominator(1000))
        stream.height, stream.width = video.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "16", "preset": "veryfast"}
        for frame in video:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    epath.Path(path).write_bytes(buffer.getvalue())


def write_dataset(out: str, config: "SyntheticConfig | Mapping[str, Any]") -> str:
    """Write `num_videos` mp4 files and `captions.jsonl` into `out`; returns the captions path.

    Video i is `video-{i:05d}.mp4`, of size sizes[i % len(sizes)] and frames[i % len(frames)] frames; its scene
    comes from (seed, i) (`scene_of`), so adding videos never changes the earlier ones. A one-frame video (a still)
    shows its scene at a time of the motion also drawn from (seed, i).
    """
    from etils import epath
    config = SyntheticConfig.from_config(config)
    epath.Path(out).mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(config.num_videos):
        scene, offset = scene_of(config, i)
        height, width = config.sizes[i % len(config.sizes)]
        frames = config.frames[i % len(config.frames)]
        still_at = float(np.random.default_rng([config.seed, i, 1]).uniform()) if frames == 1 else 0.0
        video = render(scene, frames, height, width, offset, still_at)
        name = f"video-{i:05d}.mp4"
        write_mp4(str(epath.Path(out) / name), video, config.fps)
        lines.append(json.dumps({"video": name, "caption": scene.caption}))
    path = str(epath.Path(out) / CAPTIONS)
    epath.Path(path).write_text("\n".join(lines) + "\n")
    return path


def main(argv):
    del argv
    from absl import flags
    config = flags.FLAGS.config
    path = write_dataset(flags.FLAGS.out, config.data.synthetic)
    print(f"wrote {config.data.synthetic.num_videos} videos and {path}")


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    flags.DEFINE_string("out", None, "folder for the mp4 files and captions.jsonl", required=True)
    config_flags.DEFINE_config_file("config", "configs/demo.py", "config file with a data.synthetic section")
    app.run(main)
