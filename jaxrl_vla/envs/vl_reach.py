"""VLReach-v0: a JAX-native, top-down vision-language reaching task.

Why this task exists: fine-tuning a VLA needs an environment in which both the
image and the instruction matter, that runs anywhere (no simulator, no GPU) and
that steps fast enough to show PPO working in minutes. Everything here, the
instruction included, is generated and rendered inside jit, so a whole PPO
rollout over vmapped copies stays on the device.

The scene
  A unit-square table seen from above, k objects (default 4) and an
  end-effector. Coordinates are (x, y) in [0, 1]^2; pixel (row, col) of the
  image is the point ((col + 0.5) / W, (row + 0.5) / H), so y grows downwards
  as image rows do. Objects are squares, circles and up-pointing triangles in
  red, green, blue or yellow; the effector is a white disc with a black centre
  dot, drawn over everything.

  Layout: the table is cut into a 4 x 4 grid of cells; the k objects and the
  effector take k + 1 distinct random cells and are jittered inside them. That
  keeps objects apart and the effector off every object at reset without
  rejection sampling (which would not jit).

Why the instruction matters
  Objects are drawn from a small colour x shape grid (k = 2: 1 x 2 or 2 x 1;
  k = 3, 4: 2 colours x 2 shapes; k = 5, 6: 2 x 3 or 3 x 2), with every
  (colour, shape) pair unique,
  so objects share colours and shapes with each other (for k = 4 every object
  shares its colour with one object and its shape with another: neither word
  alone identifies it). The target is then drawn uniformly among the k
  objects, independently of the scene: nothing in the image or proprio says
  which object is meant, and since touching any object ends the episode, a
  policy that ignores the instruction succeeds with probability exactly 1/k.

Instruction
  One of `TEMPLATES` (e.g. "touch the red square", "go to the blue circle",
  "touch the triangle that is green"), filled with the target's colour and
  shape words and emitted as token ids of `tokenizer()` (a WordTokenizer over
  `VOCAB`), so host-side tokenization of the same string gives the same ids.

Actions and dynamics
  Box(-1, 1, (action_dim,)). The first two entries, brought into [-1, 1]^2, are
  the effector's (dx, dy) velocity in units of `max_speed` table widths per
  step; further entries (clipped) do nothing but pay the action cost, so a
  policy learns to leave them at 0. The effector stays on the table.
  velocity_limit="clip" (default) clips each axis, as gymnasium's wrappers
  do; "scale" divides the velocity by its largest entry when that exceeds 1,
  keeping its direction. Why offer it: a Gaussian policy whose mean lies past
  the box on both axes (a BC-trained one often does: the expert moves at full
  speed) is clipped onto the diagonal, and the reward then no longer depends
  on the direction of that mean, so PPO gets no gradient to steer it; scaled,
  the direction always counts. Commands inside the box move the same way.
  (On the fine-tuning example it did not lift success overall: README.)

Reward (per step)
  progress_scale * (d_prev - d_new)    d = effector-to-target distance (below)
  - action_cost * sum(clip(a)^2)
  + success_bonus                      on touching the target
  - wrong_object_penalty               on touching another object (default 0)

  d is, with progress_distance="euclidean" (default), the straight-line
  distance to the target's centre; with "path", the length of the shortest
  path there that keeps clear of every other object (the expert's visibility
  graph, `plan_path`): the geodesic-distance reward of navigation tasks such
  as Habitat's PointNav. Why offer it: a straight-line reward pays for
  heading into an object that stands in the way (an episode-ending wrong
  touch), so the per-step reward and the task disagree exactly where the
  path bends; the path reward's best immediate step is the expert's, so even
  a short-horizon learner (small gamma) is taught the whole route, and the
  advantage of one step no longer waits on the noise of the steps after it.

  Why no wrong-object penalty by default: ending the episode already costs a
  wrong touch the success bonus it forgoes. A penalty as large as the bonus
  makes a policy that picks the right object with probability p < 1/2 better
  off touching nothing until the time limit than committing (2p - 1 < 0), and
  PPO fine-tuning of a partly grounded VLA then learns exactly that. Measured
  from one BC checkpoint with the example's PPO settings: with the penalty,
  episodes grew from 9 to 19 steps and evaluation success fell 51% -> 39% in
  37k env steps; without it, success stayed at 47-52%.

Privileged state (privileged_target=True / privileged_waypoint=True, off by default)
  obs["privileged_target_xy"]: the instructed object's centre in [-1, 1]^2
  (the proprio's units). A training-only label for an auxiliary loss
  (`policy.auxiliary_target`), which simulation can offer and a real robot
  cannot; keys with the "privileged_" prefix are never a policy input
  (`jaxrl_vla.envs.base.policy_inputs`).
  obs["privileged_waypoint_xy"] (privileged_waypoint=True): the next point of
  the expert's route to the target (`plan_path`'s waypoint; the target's
  centre itself when nothing stands in the way), in the same units. Where the
  target label says which object, this one also says how to get there
  around the others: the privileged waypoints of "Learning by Cheating"
  (Chen et al., 2019), as a label for the same kind of auxiliary loss.

Termination
  An object is "touched" when the effector centre is within
  `object_radius + effector_radius` of its centre (if two are, the nearer one
  counts). Touching the target terminates with info["success"] = True.
  Touching any other object ALSO terminates, with success False and
  info["wrong_object"] = True: if wrong touches were free, a policy could
  visit every object in turn and succeed without reading the instruction.
  `truncated` is true on step `max_episode_steps` (default 50), also when that
  step terminates (learners let `terminated` win), as in CartPole.

Observation (a flat dict)
  rgb           uint8 [S, S, 3]
  depth         float32 [S, S, 1] (only with use_depth=True): distance from the
                camera, 1 on the table, 1 - OBJECT_HEIGHT on objects,
                1 - EFFECTOR_HEIGHT on the effector
  proprio       float32 [4]: effector position mapped to [-1, 1] and its last
                velocity command (clipped action, in [-1, 1]); float32 [2], the
                position alone, with proprio_velocity=False. Why offer that: the
                dynamics are first order (the next position is the position plus
                the command), so the last command tells an optimal policy nothing,
                while a policy trained on demonstrations learns to repeat it, the
                expert's paths being straight ("copycat", Wen et al. 2020). Measured
                on the example's clone continued by one epoch of BC with it as an
                input: held-out action error 0.166 against 0.171 without, closed-loop
                success 76.7% against 83.2% (docs/finetune_findings.md).
  language      int32 [L] token ids, 0-padded on the right
  language_mask bool [L]

A privileged scripted expert, `expert_action`, reads the state and drives to
the target around the other objects on a visibility-graph shortest path; it
succeeds in ~100% of episodes (4095/4096 at k = 4; ~99% at k = 6, where other
objects more often wall a target in).

detour_bias (table widths, default 0: the shortest path) makes the expert
pass an object in its way on one side, the object's right as seen in the
image, unless the other side is shorter by more than that. Objects sit on a
4x4 layout grid, so the ones in the way mostly stand nearly on the straight
line: at k = 4, 21% of scenes start with one there, the two sides differ by
a median 0.043 (less than a step at full speed) and the shortest path goes
left in 49% of them, as the layout jitter falls. Demonstrations of that are
two-valued where the image barely differs; a Gaussian policy cloned from them
averages the two sides into the straight line and runs into the object (11%
success in those scenes, against 76% elsewhere). A consistent side is one
decision to learn: at 0.1 the expert's first step there goes right in 92%.
It only charges the first leg (`plan_path`), which costs the expert some
dithering: 99.1% success at 0.1 (2,048 episodes). With
progress_distance="path" the reward measures the same route (its length plus
the bias while it bends left), so the reward's best step stays the expert's.

detour_margin (table widths, default 0.02) is how far outside the touch
radius the route's corners stay (its legs keep half of it). The default
route is tight, which an exact expert can afford and a learnt policy cannot:
the expert itself, its actions perturbed by N(0, 0.3), succeeds in 63% of the
scenes with an object in the way at 0.02 and in 96% at 0.08 (99% elsewhere;
4,096 episodes, detour_bias 0.1).
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxrl_vla.envs.base import PRIVILEGED_PREFIX, Box, TimeStep
from jaxrl_vla.tokenizer import PAD_ID, WordTokenizer

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
SHAPES: tuple[str, ...] = ("square", "circle", "triangle")
COLOUR_RGB = np.array([[220, 50, 50], [40, 170, 70], [50, 100, 235], [235, 205, 40]], np.uint8)
BACKGROUND_RGB = np.array([70, 70, 70], np.uint8)
EFFECTOR_RGB = np.array([255, 255, 255], np.uint8)
EFFECTOR_DOT_RGB = np.array([0, 0, 0], np.uint8)

_FILLERS: tuple[str, ...] = ("touch", "go", "to", "the", "reach", "move", "for", "that", "is")
VOCAB: tuple[str, ...] = _FILLERS + COLOURS + SHAPES
"""Instruction words in id order: word VOCAB[i] has token id i + 2 (0 pad, 1 unk)."""

TEMPLATES: tuple[str, ...] = (
    "touch the {colour} {shape}",
    "go to the {colour} {shape}",
    "reach the {colour} {shape}",
    "move to the {colour} {shape}",
    "reach for the {colour} {shape}",
    "touch the {shape} that is {colour}",
)

GRID_CELLS = 4  # layout grid per side
# The square's half-side in object radii: 1.0 makes it the circle plus its four corners (areas at
# r = 0.07 on 64 px: square 81, circle 63, triangle 45 pixels). Why not a square of about the circle's
# area (half-side 0.85 r, as before): at 64 px the two then differ in a few edge pixels, and the
# frozen image tokens of the fine-tuning example's BC-trained ResNet told only 93.2% of objects apart
# (benchmarks/probes/vision_probe.py, MLP probe), nearly every error a square taken for a circle or back;
# with the corners drawn, 98.6%.
SQUARE_HALF_SIDE = 1.0
OBJECT_HEIGHT = 0.1
EFFECTOR_HEIGHT = 0.2
PROPRIO_DIM = 4
PROPRIO_POSITION_DIM = 2  # proprio_velocity=False: the effector position alone
_COLOUR_SLOT = -1  # placeholders in the template table
_SHAPE_SLOT = -2
MAX_OBJECTS = 6
PROGRESS_DISTANCES = ("euclidean", "path")
VELOCITY_LIMITS = ("clip", "scale")
# privileged_target=True: the instructed object's centre, mapped to [-1, 1] like the proprio
PRIVILEGED_TARGET_KEY = PRIVILEGED_PREFIX + "target_xy"
# privileged_waypoint=True: the next point of the expert's route to it (plan_path), in the same units
PRIVILEGED_WAYPOINT_KEY = PRIVILEGED_PREFIX + "waypoint_xy"


def tokenizer(max_length: int = 8) -> WordTokenizer:
    """The WordTokenizer whose ids the env emits (same VOCAB, same order)."""
    return WordTokenizer(VOCAB, max_length)


def word_id(word: str) -> int:
    """Token id of a vocabulary word (what `tokenizer()` maps it to)."""
    return VOCAB.index(word) + 2


def compile_templates(templates: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Templates -> (ids [T, L] int32 with slot markers, mask [T, L] bool), checked on the host.

    Done once at construction so that reset only indexes a constant table.
    """
    if not templates:
        raise ValueError("templates must not be empty")
    ids = np.full((len(templates), max_length), PAD_ID, np.int32)
    mask = np.zeros((len(templates), max_length), bool)
    for row, template in enumerate(templates):
        words = re.findall(r"\{colour\}|\{shape\}|[a-z0-9]+", template.lower())
        if words.count("{colour}") != 1 or words.count("{shape}") != 1:
            raise ValueError(f"template {template!r} must contain {{colour}} and {{shape}} exactly once")
        if len(words) > max_length:
            raise ValueError(f"template {template!r} has {len(words)} words > instruction_length={max_length}")
        for col, w in enumerate(words):
            if w == "{colour}":
                ids[row, col] = _COLOUR_SLOT
            elif w == "{shape}":
                ids[row, col] = _SHAPE_SLOT
            elif w in VOCAB:
                ids[row, col] = word_id(w)
            else:
                raise ValueError(f"template {template!r}: word {w!r} is not in VOCAB {VOCAB}")
        mask[row, : len(words)] = True
    return ids, mask


def attribute_grid(num_objects: int) -> tuple[int, int]:
    """(colours, shapes) of the grid objects are drawn from: the smallest with room for k.

    Small grids force objects to share colours and shapes, so both words count.
    """
    shapes = min(len(SHAPES), max(2, math.ceil(math.sqrt(num_objects))))
    return math.ceil(num_objects / shapes), shapes


@struct.dataclass
class VLReachState:
    """Everything that changes within an episode; objects are fixed after reset.

    The instruction is kept as a template index and rebuilt by `observe`, so no
    observation leaf is the same buffer as a state leaf: the Trainer donates
    env state and observation together, and XLA refuses one buffer donated twice.
    """

    effector: jax.Array  # [2] float32 position
    velocity: jax.Array  # [2] float32 last clipped velocity command
    object_pos: jax.Array  # [k, 2] float32 centres
    object_colour: jax.Array  # [k] int32 index into COLOURS
    object_shape: jax.Array  # [k] int32 index into SHAPES
    target: jax.Array  # int32 index of the instructed object
    template: jax.Array  # int32 index of the instruction template
    time: jax.Array  # int32 steps taken


# ---------------------------------------------------------------------------- rendering


def pixel_centres(size: int) -> jax.Array:
    """Table coordinates of the pixel centres along one image axis."""
    return (jnp.arange(size, dtype=jnp.float32) + 0.5) / size


def row_half_widths(centre_y: jax.Array, shape: jax.Array, size: int, radius: float) -> jax.Array:
    """float [k, S]: each object's half-width on every pixel row (-1 where the row misses it).

    Scanline rasterisation: a pixel centre is inside an object when its
    horizontal distance to the object's centre is at most the object's
    half-width on that row, so the per-shape geometry is evaluated on k x S
    rows and the k x S x S pixel test is a single compare (~3x faster on CPU
    than evaluating every shape's inequality at every pixel).

    Shapes: a square of half-side `SQUARE_HALF_SIDE` x r (the circle plus
    its four corners), a circle of radius r, and an up-pointing triangle
    (apex 1.1 r above the centre, base 0.9 r below it, base half-width 1.1 r).
    """
    dy = pixel_centres(size)[None, :] - centre_y[:, None]  # [k, S]
    half = SQUARE_HALF_SIDE * radius
    square = jnp.where(jnp.abs(dy) <= half, half, -1.0)
    circle = disc_half_widths(dy, radius)
    apex, base = -1.1 * radius, 0.9 * radius
    triangle = jnp.where((dy >= apex) & (dy <= base), 1.1 * radius * (dy - apex) / (base - apex), -1.0)
    kind = shape[:, None]
    return jnp.where(kind == 0, square, jnp.where(kind == 1, circle, triangle))


def disc_half_widths(dy: jax.Array, radius: float) -> jax.Array:
    """Half-width of a disc on rows at vertical offsets dy (-1 where the row misses it)."""
    return jnp.where(jnp.abs(dy) <= radius, jnp.sqrt(jnp.maximum(radius * radius - dy * dy, 0.0)), -1.0)


def scanline_masks(centre_x: jax.Array, half_widths: jax.Array, size: int) -> jax.Array:
    """bool [n, S, S] from centres x [n] and row half-widths [n, S]: |x_col - x| <= w_row."""
    dx = jnp.abs(pixel_centres(size)[None, :] - centre_x[:, None])  # [n, S] over columns
    return dx[:, None, :] <= half_widths[:, :, None]


def object_masks(pos: jax.Array, shape: jax.Array, size: int, radius: float) -> jax.Array:
    """bool [k, S, S]: which pixel centres fall inside each object."""
    return scanline_masks(pos[:, 0], row_half_widths(pos[:, 1], shape, size, radius), size)


def effector_masks(effector: jax.Array, size: int, radius: float) -> jax.Array:
    """bool [2, S, S]: the effector's disc and its centre dot (0.4 of its radius)."""
    dy = pixel_centres(size) - effector[1]
    widths = jnp.stack([disc_half_widths(dy, radius), disc_half_widths(dy, 0.4 * radius)])
    return scanline_masks(jnp.stack([effector[0], effector[0]]), widths, size)


def render_rgb(state: VLReachState, size: int, object_radius: float, effector_radius: float) -> jax.Array:
    """uint8 [S, S, 3] top-down image: background, objects, then the effector on top."""
    masks = jnp.concatenate(
        [object_masks(state.object_pos, state.object_shape, size, object_radius),
         effector_masks(state.effector, size, effector_radius)]
    )  # [k + 2, S, S]
    colours = jnp.concatenate(
        [jnp.asarray(COLOUR_RGB)[state.object_colour], jnp.asarray(np.stack([EFFECTOR_RGB, EFFECTOR_DOT_RGB]))]
    )
    rgb = jnp.broadcast_to(jnp.asarray(BACKGROUND_RGB), (size, size, 3))
    for i in range(masks.shape[0]):  # painter's order; k is static and small
        rgb = jnp.where(masks[i][..., None], colours[i], rgb)
    return rgb


def render_depth(state: VLReachState, size: int, object_radius: float, effector_radius: float) -> jax.Array:
    """float32 [S, S, 1] distance from an overhead camera one unit above the table."""
    objects = object_masks(state.object_pos, state.object_shape, size, object_radius).any(axis=0)
    effector = effector_masks(state.effector, size, effector_radius)[0]
    depth = jnp.where(objects, 1.0 - OBJECT_HEIGHT, 1.0)
    depth = jnp.where(effector, 1.0 - EFFECTOR_HEIGHT, depth)
    return depth[..., None].astype(jnp.float32)


# ---------------------------------------------------------------------------- scene sampling


def random_order(u: jax.Array) -> jax.Array:
    """A uniformly random permutation of 0..n-1 from n uniform numbers (one argsort)."""
    return jnp.argsort(u)


def attribute_uniforms(num_objects: int) -> int:
    """How many uniform numbers `sample_attributes` consumes."""
    rows, cols = attribute_grid(num_objects)
    return len(COLOURS) + len(SHAPES) + rows * cols + 1


def layout_uniforms(num_objects: int) -> int:
    """How many uniform numbers `sample_layout` consumes."""
    return GRID_CELLS * GRID_CELLS + 2 * (num_objects + 1)


def sample_attributes(u: jax.Array, num_objects: int) -> tuple[jax.Array, jax.Array]:
    """Distinct (colour, shape) pairs for k objects from a small random grid (see module doc).

    Takes uniform numbers rather than a key, like every sampler here: reset
    draws all its randomness in ONE jax.random.uniform call, because each
    threefry call is unrolled into the program and they dominated compile time.
    """
    rows, cols = attribute_grid(num_objects)
    n_c, n_s = len(COLOURS), len(SHAPES)
    colour_perm = random_order(u[:n_c])
    shape_perm = random_order(u[n_c : n_c + n_s])
    cells = random_order(u[n_c + n_s : n_c + n_s + rows * cols])[:num_objects]
    r, c = cells // cols, cells % cols
    # Swap the grid's roles half of the time (when both fit) so neither attribute is always the scarcer one.
    can_flip = rows <= n_s and cols <= n_c and rows != cols
    flip = (u[n_c + n_s + rows * cols] < 0.5) & can_flip
    colour = colour_perm[jnp.where(flip, c, r)]
    shape = shape_perm[jnp.where(flip, r, c)]
    return colour.astype(jnp.int32), shape.astype(jnp.int32)


def sample_layout(u: jax.Array, num_objects: int, jitter: float) -> tuple[jax.Array, jax.Array]:
    """Object centres [k, 2] and effector start [2] in k + 1 distinct grid cells, jittered."""
    n_cells = GRID_CELLS * GRID_CELLS
    cells = random_order(u[:n_cells])[: num_objects + 1]
    centres = jnp.stack([cells % GRID_CELLS, cells // GRID_CELLS], axis=-1).astype(jnp.float32)
    centres = (centres + 0.5) / GRID_CELLS
    offsets = u[n_cells : n_cells + 2 * (num_objects + 1)].reshape(num_objects + 1, 2)
    centres = centres + jitter * (2.0 * offsets - 1.0)
    return centres[:num_objects], centres[num_objects]


def uniform_index(u: jax.Array, n: int) -> jax.Array:
    """An index uniform on 0..n-1 from one uniform number in [0, 1)."""
    return jnp.minimum(jnp.floor(u * n), n - 1).astype(jnp.int32)


def fill_instruction(
    template_ids: jax.Array, template_mask: jax.Array, index: jax.Array, colour: jax.Array, shape: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Token ids [L] and mask [L] of template `index` filled with a colour and a shape."""
    row = template_ids[index]
    colour_ids = jnp.asarray([word_id(c) for c in COLOURS], jnp.int32)
    shape_ids = jnp.asarray([word_id(s) for s in SHAPES], jnp.int32)
    ids = jnp.where(row == _COLOUR_SLOT, colour_ids[colour], jnp.where(row == _SHAPE_SLOT, shape_ids[shape], row))
    return ids.astype(jnp.int32), template_mask[index]


# ---------------------------------------------------------------------------- expert


def segments_clear(a: jax.Array, b: jax.Array, centres: jax.Array, blocking: jax.Array, radius: jax.Array | float) -> jax.Array:
    """bool [...]: segment a-b ([..., 2], broadcast) keeps `radius` (scalar or per centre [k])
    away from every blocking centre [k, 2].

    Written on separate x / y arrays and squared distances: XLA on CPU
    vectorises [..., k] scalar fields far better than trailing axes of size 2,
    and this test is most of the expert's cost (the vector form made the expert ~9x slower).
    """
    ax, ay, bx, by = a[..., 0, None], a[..., 1, None], b[..., 0, None], b[..., 1, None]
    abx, aby = bx - ax, by - ay
    inv = 1.0 / jnp.maximum(abx * abx + aby * aby, 1e-12)
    acx, acy = centres[:, 0] - ax, centres[:, 1] - ay  # [..., k]
    t = jnp.clip((acx * abx + acy * aby) * inv, 0.0, 1.0)
    dx, dy = acx - t * abx, acy - t * aby
    radius = jnp.asarray(radius)
    return jnp.all((dx * dx + dy * dy >= radius * radius) | ~blocking, axis=-1)


class PathPlan(NamedTuple):
    """What `plan_path` finds: where to head next, the node after it, and how far the goal is that way."""

    waypoint: jax.Array  # [2]
    following: jax.Array  # [2] the node after the waypoint (the goal when the waypoint is the goal)
    length: jax.Array  # scalar: path length from the effector to the goal (Euclidean when no path exists)


def plan_path(
    effector: jax.Array,
    goal: jax.Array,
    obstacles: jax.Array,
    blocking: jax.Array,
    touch_radius: float,
    bounds: tuple[float, float],
    margin: float = 0.02,
    ring: int = 8,
    side_bias: float = 0.0,
) -> PathPlan:
    """A shortest collision-free path from the effector to `goal`: its next point, the one after it, its length.

    A visibility graph, rebuilt every call so the expert stays a pure function
    of the state: its nodes are the goal and `ring` points around every
    obstacle (a polygon whose edges stay `margin` outside the touch radius),
    its edges the segments that keep `margin / 2` clear of every obstacle's
    touch radius. Bellman-Ford from the goal gives each node's path length;
    the effector heads for the visible node with the shortest total.
    Neighbouring obstacles' keep-out discs can overlap into walls, which
    potential fields get stuck on and this graph routes around; gaps too narrow
    for the margin are not used, so a step never has to thread a needle.
    Falls back to the goal itself, at its straight-line distance, when no
    path exists (a target or an effector walled in by other objects and the
    table edge: rare).

    side_bias > 0 makes the choice of side consistent: a first leg that bends
    to the left of the straight line from the effector to the goal (as seen in
    the image, whose y axis points down) costs `side_bias` more, so an object
    in the way is passed on its right side unless the left is shorter by more
    than that; the returned length (the route's cost) includes it. Only the
    first leg pays: later legs bend both ways around the objects they pass,
    and charging them too (measured) left the side mixed (66% right where the
    two sides are within 0.1, against 100%). The price: the charge follows
    the effector's own line, so the expert dithers now and then (99.1%
    success at 0.1). Why: objects sit on a layout grid, so the ones in the
    way mostly stand almost on the straight line, the two sides then differ
    by a few hundredths of the table, and the shortest path picks its side
    by the layout jitter: demonstrations of it go left and right evenly from
    scenes that look the same, a cloned policy averages them into the
    straight line and runs into the object.
    """
    ring_radius = (touch_radius + margin) / math.cos(math.pi / ring)
    angles = 2 * math.pi * np.arange(ring) / ring
    offsets = ring_radius * np.stack([np.cos(angles), np.sin(angles)], -1).astype(np.float32)
    nodes = jnp.concatenate([goal[None], (obstacles[:, None, :] + offsets).reshape(-1, 2)])  # [M, 2]
    lo, hi = bounds
    clear_radius = touch_radius + 0.5 * margin
    inside = jnp.all((nodes >= lo) & (nodes <= hi), axis=-1)
    gaps = jnp.linalg.norm(nodes[:, None, :] - obstacles[None], axis=-1)  # [M, k]
    node_ok = (inside & jnp.all((gaps >= clear_radius) | ~blocking, axis=-1)).at[0].set(True)
    edges = segments_clear(nodes[:, None, :], nodes[None, :, :], obstacles, blocking, clear_radius)
    length = jnp.linalg.norm(nodes[:, None, :] - nodes[None, :, :], axis=-1)
    count = nodes.shape[0]
    usable = edges & node_ok[:, None] & node_ok[None, :] & ~jnp.eye(count, dtype=bool)
    weight = jnp.where(usable, length, jnp.inf)
    to_goal = jnp.full((count,), jnp.inf).at[0].set(0.0)
    # Bellman-Ford from the goal. A shortest path passes each obstacle at most once, over at most
    # half its ring, so this many relaxations suffice (count - 1 would be the general bound).
    hops = min(count - 1, (ring // 2 + 1) * obstacles.shape[0] + 1)
    to_goal = jax.lax.fori_loop(0, hops, lambda _, d: jnp.minimum(d, jnp.min(weight + d[None, :], axis=1)), to_goal)
    # An effector already inside the margin band may still leave it: relax its own clearance.
    own = jnp.minimum(clear_radius, jnp.linalg.norm(effector - obstacles, axis=-1) - 1e-4)
    away = jnp.linalg.norm(nodes - effector, axis=-1)
    visible = segments_clear(effector[None], nodes, obstacles, blocking, own) & node_ok
    visible = visible & ((away > 1e-5) | (jnp.arange(count) == 0))  # never "head" for where it already is
    first_leg = away + side_bias * bends_left(effector[None], nodes, goal)
    total = jnp.where(visible, first_leg + to_goal, jnp.inf)
    best = jnp.argmin(total)
    after = jnp.argmin(weight[best] + to_goal)  # the node after the waypoint (the goal: itself)
    found = jnp.isfinite(total[best])
    return PathPlan(
        waypoint=jnp.where(found, nodes[best], goal),
        following=jnp.where(found & (best != 0), nodes[after], goal),
        length=jnp.where(found, total[best], jnp.linalg.norm(goal - effector)),
    )


def bends_left(start: jax.Array, end: jax.Array, goal: jax.Array) -> jax.Array:
    """float [...] (1.0 or 0.0): leg start-end ([..., 2], broadcast) heads to the left of the straight line
    from its start to `goal` [2] (image axes: x right, y down, so a negative cross product is the left)."""
    to_goal, leg = goal - start, end - start
    return (to_goal[..., 0] * leg[..., 1] - to_goal[..., 1] * leg[..., 0] < 0.0).astype(jnp.float32)


def goal_velocity(
    state: VLReachState,
    goal: jax.Array,
    touch_radius: float,
    max_speed: float,
    bounds: tuple[float, float],
    margin: float = 0.02,
    side_bias: float = 0.0,
) -> jax.Array:
    """The [2] velocity command in [-1, 1] toward object `goal` around every other object.

    Full speed toward the next waypoint of `plan_path`. The step is cut
    short at the waypoint when running past it would come too close to an
    obstacle or lose sight of the node after it (the path would then turn
    back); otherwise it runs past, so paths stay tight without wasting steps.
    """
    k = state.object_pos.shape[0]
    blocking = jnp.arange(k) != goal
    target = state.object_pos[goal]
    waypoint, following, _ = plan_path(state.effector, target, state.object_pos, blocking, touch_radius, bounds, margin,
                                       side_bias=side_bias)
    delta = waypoint - state.effector
    full = delta / jnp.maximum(jnp.max(jnp.abs(delta)), 1e-6)  # L-inf unit: full speed
    lo, hi = bounds
    after = jnp.clip(state.effector + max_speed * full, lo, hi)
    clear_radius = touch_radius + 0.5 * margin
    own = jnp.minimum(clear_radius, jnp.linalg.norm(state.effector - state.object_pos, axis=-1) - 1e-4)
    safe = segments_clear(state.effector, after, state.object_pos, blocking, own)
    own_after = jnp.minimum(clear_radius, jnp.linalg.norm(after - state.object_pos, axis=-1) - 1e-4)
    sees_next = segments_clear(after, following, state.object_pos, blocking, own_after)
    cut = jnp.minimum(1.0, jnp.linalg.norm(delta) / jnp.maximum(max_speed * jnp.linalg.norm(full), 1e-6))
    return jnp.clip(jnp.where(safe & sees_next, full, full * cut), -1.0, 1.0)


# ---------------------------------------------------------------------------- env


class VLReach:
    """JAX-native vision-language reaching (see module docstring)."""

    reports_success = True
    # demo-file columns that augment_demonstration reads besides the action (demo_augment_labels makes them)
    demo_augment_label_keys = ("mirror_action",)

    def __init__(
        self,
        num_objects: int = 4,
        image_size: int = 64,
        action_dim: int = 2,
        max_episode_steps: int = 50,
        instruction_length: int = 8,
        use_depth: bool = False,
        max_speed: float = 0.05,
        object_radius: float = 0.07,
        effector_radius: float = 0.045,
        layout_jitter: float = 0.04,
        progress_scale: float = 2.0,
        action_cost: float = 0.01,
        success_bonus: float = 1.0,
        wrong_object_penalty: float = 0.0,
        progress_distance: str = "euclidean",
        templates: Sequence[str] | None = None,
        privileged_target: bool = False,
        privileged_waypoint: bool = False,
        velocity_limit: str = "clip",
        detour_bias: float = 0.0,
        detour_margin: float = 0.02,
        proprio_velocity: bool = True,
    ):
        if not 2 <= num_objects <= MAX_OBJECTS:
            raise ValueError(f"num_objects must be in [2, {MAX_OBJECTS}], got {num_objects}")
        if image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {image_size}")
        if action_dim < 2:
            raise ValueError(f"action_dim must be >= 2 (planar velocity), got {action_dim}")
        if max_episode_steps < 1:
            raise ValueError(f"max_episode_steps must be >= 1, got {max_episode_steps}")
        if progress_distance not in PROGRESS_DISTANCES:
            raise ValueError(f"progress_distance must be one of {PROGRESS_DISTANCES}, got {progress_distance!r}")
        if velocity_limit not in VELOCITY_LIMITS:
            raise ValueError(f"velocity_limit must be one of {VELOCITY_LIMITS}, got {velocity_limit!r}")
        if not detour_bias >= 0:
            raise ValueError(f"detour_bias must be >= 0 (table widths), got {detour_bias}")
        if not detour_margin > 0:
            raise ValueError(f"detour_margin must be > 0 (table widths), got {detour_margin}")
        if max_speed <= 0:
            raise ValueError(f"max_speed must be > 0, got {max_speed}")
        cell_half = 0.5 / GRID_CELLS
        # Separation needed so that objects never overlap and the effector never starts touching one.
        if 2 * (cell_half - layout_jitter) <= object_radius + effector_radius or 2 * (cell_half - layout_jitter) <= 2.2 * object_radius:
            raise ValueError(
                f"object_radius={object_radius}, effector_radius={effector_radius} and layout_jitter={layout_jitter} "
                f"are too large for a {GRID_CELLS}x{GRID_CELLS} layout grid"
            )
        self.num_objects = int(num_objects)
        self.image_size = int(image_size)
        self.action_dim = int(action_dim)
        self._max_episode_steps = int(max_episode_steps)
        self.instruction_length = int(instruction_length)
        self.use_depth = bool(use_depth)
        self.max_speed = float(max_speed)
        self.object_radius = float(object_radius)
        self.effector_radius = float(effector_radius)
        self.touch_radius = self.object_radius + self.effector_radius
        self.layout_jitter = float(layout_jitter)
        self.progress_scale = float(progress_scale)
        self.action_cost = float(action_cost)
        self.success_bonus = float(success_bonus)
        self.wrong_object_penalty = float(wrong_object_penalty)
        self.progress_distance = str(progress_distance)
        self.templates = tuple(TEMPLATES if templates is None else templates)
        self.privileged_target = bool(privileged_target)
        self.privileged_waypoint = bool(privileged_waypoint)
        self.velocity_limit = str(velocity_limit)
        self.detour_bias = float(detour_bias)
        self.detour_margin = float(detour_margin)
        self.proprio_velocity = bool(proprio_velocity)
        self._template_ids, self._template_mask = compile_templates(self.templates, self.instruction_length)

    def config(self) -> dict:
        """Every constructor argument (JSON-friendly): demo files record it so the env can be rebuilt."""
        return dict(
            num_objects=self.num_objects, image_size=self.image_size, action_dim=self.action_dim,
            max_episode_steps=self._max_episode_steps, instruction_length=self.instruction_length,
            use_depth=self.use_depth, max_speed=self.max_speed, object_radius=self.object_radius,
            effector_radius=self.effector_radius, layout_jitter=self.layout_jitter,
            progress_scale=self.progress_scale, action_cost=self.action_cost, success_bonus=self.success_bonus,
            wrong_object_penalty=self.wrong_object_penalty, progress_distance=self.progress_distance,
            templates=list(self.templates), privileged_target=self.privileged_target,
            privileged_waypoint=self.privileged_waypoint, velocity_limit=self.velocity_limit,
            detour_bias=self.detour_bias, detour_margin=self.detour_margin, proprio_velocity=self.proprio_velocity,
        )

    def _config(self) -> tuple:
        return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in self.config().items())

    def __eq__(self, other: object) -> bool:
        # Equal-config envs compare (and hash) equal so that jit caches keyed on the env are shared.
        return type(other) is type(self) and other._config() == self._config()

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._config()))

    # ------------------------------------------------------------------ spaces

    @property
    def observation_space(self) -> dict[str, Box]:
        s, length = self.image_size, self.instruction_length
        space = {
            "rgb": Box(0, 255, (s, s, 3), jnp.uint8),
            "proprio": Box(-1.0, 1.0, (PROPRIO_DIM if self.proprio_velocity else PROPRIO_POSITION_DIM,), jnp.float32),
            "language": Box(0, len(VOCAB) + 1, (length,), jnp.int32),
            "language_mask": Box(0, 1, (length,), jnp.bool_),
        }
        if self.use_depth:
            space["depth"] = Box(0.0, 1.0, (s, s, 1), jnp.float32)
        if self.privileged_target:
            space[PRIVILEGED_TARGET_KEY] = Box(-1.0, 1.0, (2,), jnp.float32)
        if self.privileged_waypoint:
            space[PRIVILEGED_WAYPOINT_KEY] = Box(-1.0, 1.0, (2,), jnp.float32)
        return space

    @property
    def action_space(self) -> Box:
        return Box(-1.0, 1.0, (self.action_dim,), jnp.float32)

    @property
    def effector_bounds(self) -> tuple[float, float]:
        """(lo, hi) of the effector centre on each axis: it stays on the table. Dynamics, expert and path share it."""
        return self.effector_radius, 1.0 - self.effector_radius

    @property
    def max_episode_steps(self) -> int:
        return self._max_episode_steps

    def tokenizer(self) -> WordTokenizer:
        """The WordTokenizer matching this env's language ids and length."""
        return tokenizer(self.instruction_length)

    # ------------------------------------------------------------------ core

    def proprio(self, state: VLReachState) -> jax.Array:
        """The effector position in [-1, 1]^2, then (proprio_velocity) its last velocity command."""
        position = 2.0 * state.effector - 1.0
        parts = [position, state.velocity] if self.proprio_velocity else [position]
        return jnp.concatenate(parts).astype(jnp.float32)

    def observe(self, state: VLReachState) -> dict[str, jax.Array]:
        """The observation dict of a state (rendering included)."""
        language, mask = self.language(state)
        obs = {
            "rgb": render_rgb(state, self.image_size, self.object_radius, self.effector_radius),
            "proprio": self.proprio(state),
            "language": language,
            "language_mask": mask,
        }
        if self.use_depth:
            obs["depth"] = render_depth(state, self.image_size, self.object_radius, self.effector_radius)
        if self.privileged_target:
            obs[PRIVILEGED_TARGET_KEY] = (2.0 * state.object_pos[state.target] - 1.0).astype(jnp.float32)
        if self.privileged_waypoint:
            obs[PRIVILEGED_WAYPOINT_KEY] = (2.0 * self.target_plan(state).waypoint - 1.0).astype(jnp.float32)
        return obs

    def reset(self, key: jax.Array) -> tuple[VLReachState, dict[str, jax.Array]]:
        """A fresh scene, target and instruction; the env needs no randomness after this."""
        n_attr, n_layout = attribute_uniforms(self.num_objects), layout_uniforms(self.num_objects)
        u = jax.random.uniform(key, (n_attr + n_layout + 2,))  # all of reset's randomness in one draw
        colour, shape = sample_attributes(u[:n_attr], self.num_objects)
        pos, effector = sample_layout(u[n_attr : n_attr + n_layout], self.num_objects, self.layout_jitter)
        # The target is drawn independently of the scene: nothing but the instruction identifies it.
        target = uniform_index(u[-2], self.num_objects)
        template = uniform_index(u[-1], len(self.templates))
        state = VLReachState(
            effector=effector,
            velocity=jnp.zeros((2,), jnp.float32),
            object_pos=pos,
            object_colour=colour,
            object_shape=shape,
            target=target,
            template=template,
            time=jnp.int32(0),
        )
        return state, self.observe(state)

    def step(self, state: VLReachState, action: jax.Array) -> tuple[VLReachState, TimeStep]:
        """Move the effector by the commanded velocity; reward, touch and time limit."""
        action = self.applied_action(action)
        velocity = action[:2]
        lo, hi = self.effector_bounds
        effector = jnp.clip(state.effector + self.max_speed * velocity, lo, hi)
        new = state.replace(effector=effector, velocity=velocity, time=state.time + 1)

        dists = jnp.linalg.norm(effector[None, :] - state.object_pos, axis=-1)
        nearest = jnp.argmin(dists)
        touching = dists[nearest] < self.touch_radius
        success = touching & (nearest == state.target)
        wrong = touching & (nearest != state.target)
        reward = (
            self.progress_scale * (self.target_distance(state) - self.target_distance(new))
            - self.action_cost * jnp.sum(action * action)
            + self.success_bonus * success
            - self.wrong_object_penalty * wrong
        ).astype(jnp.float32)
        truncated = new.time >= self._max_episode_steps
        info = {"success": success, "wrong_object": wrong}
        return new, TimeStep(self.observe(new), reward, touching, truncated, info)

    def applied_action(self, action: jax.Array) -> jax.Array:
        """The command the step executes: `action` brought into the box [-1, 1]^action_dim (`velocity_limit`)."""
        action = jnp.asarray(action, jnp.float32).reshape(self.action_dim)
        if self.velocity_limit == "clip":
            return jnp.clip(action, -1.0, 1.0)
        velocity = action[:2] / jnp.maximum(1.0, jnp.max(jnp.abs(action[:2])))
        return jnp.concatenate([velocity, jnp.clip(action[2:], -1.0, 1.0)])

    # ------------------------------------------------------------------ expert & helpers

    def target_distance(self, state: VLReachState) -> jax.Array:
        """The effector's distance to the target that the progress reward measures (`progress_distance`)."""
        if self.progress_distance == "euclidean":
            return jnp.linalg.norm(state.effector - state.object_pos[state.target])
        return self.target_plan(state).length

    def target_plan(self, state: VLReachState) -> PathPlan:
        """The expert's shortest path from the effector to the target around the other objects (`plan_path`)."""
        blocking = jnp.arange(self.num_objects) != state.target
        return plan_path(state.effector, state.object_pos[state.target], state.object_pos, blocking,
                         self.touch_radius, self.effector_bounds, margin=self.detour_margin, side_bias=self.detour_bias)

    def mirrored(self, state: VLReachState) -> VLReachState:
        """The state mirrored left-right (x -> 1 - x; the velocity's x negated): what the image's columns
        reversed show. Exact: every shape is symmetric about its vertical axis and pixel centres map
        onto pixel centres. The expert's action there is a mirror-augmentation label
        (`demo_augment_labels`): with `detour_bias` it is not the mirror of the expert's action here."""
        flip = lambda xy: xy.at[..., 0].set(1.0 - xy[..., 0])  # noqa: E731
        return state.replace(effector=flip(state.effector), object_pos=flip(state.object_pos),
                             velocity=state.velocity.at[0].set(-state.velocity[0]))

    def demo_augment_labels(self, state: VLReachState) -> dict[str, jax.Array]:
        """Per-step labels `augment_demonstration` needs besides the expert's action (the demo file's
        `demo_augment_label_keys` columns): the expert's action in the mirrored scene."""
        return {"mirror_action": self.expert_action(self.mirrored(state))}

    def augment_demonstration(self, key: jax.Array, obs: dict[str, jax.Array], action: jax.Array,
                              labels: dict[str, jax.Array]) -> tuple[dict[str, jax.Array], jax.Array]:
        """One demonstration (obs, expert action) seen through label-preserving changes of the scene.

        The colours permuted: a random permutation of `COLOURS` recolours the objects in the image and
        renames the colour words of the instruction together, so the named object and the expert's
        action stay the same. Why: a clone that has seen the demonstrations' scenes a few times can
        predict the action from the scene alone; recoloured, only by matching the instruction to the
        image. Pixels of exactly a palette colour are objects (the renderer draws them unblended); the
        background and the effector are not in the palette.
        Mirrored left-right with probability 1/2 (`mirrored`): the image's columns reversed, the
        proprio's x negated, and the label `labels["mirror_action"]`, the expert's own action there.
        Why: twice the scenes with an object in the way, seen from both sides.
        `bridge.pretrain_bc` trains with both; one epoch of BC from the example's clone reached 83.2%
        closed-loop success with both, 77.6% with the colours alone, 67.3% with neither
        (docs/finetune_findings.md). PPO's demonstration loss applies it to every draw
        (`algorithm.demo_augment`). Unbatched: vmap it.
        """
        colour_key, mirror_key = jax.random.split(key)
        perm = jax.random.permutation(colour_key, len(COLOURS))  # colour c becomes colour perm[c]
        palette = jnp.asarray(COLOUR_RGB)
        rgb = obs["rgb"]
        match = jnp.all(rgb[..., None, :] == palette, axis=-1)  # [H, W, C]
        recoloured = palette[perm][jnp.argmax(match, axis=-1)]
        out = {**obs, "rgb": jnp.where(match.any(-1, keepdims=True), recoloured, rgb).astype(rgb.dtype)}
        colour_ids = jnp.asarray([word_id(c) for c in COLOURS], obs["language"].dtype)
        is_colour = obs["language"][..., None] == colour_ids  # [L, C]
        renamed = colour_ids[perm][jnp.argmax(is_colour, axis=-1)]
        out["language"] = jnp.where(is_colour.any(-1), renamed, obs["language"])

        mirror = jax.random.bernoulli(mirror_key)
        x_entries = jnp.arange(out["proprio"].shape[-1]) % 2 == 0  # x of the position (and of the velocity)
        mirrored = {**out, "rgb": out["rgb"][:, ::-1], "proprio": jnp.where(x_entries, -out["proprio"], out["proprio"])}
        if "depth" in out:
            mirrored["depth"] = out["depth"][:, ::-1]
        out = jax.tree_util.tree_map(lambda m, o: jnp.where(mirror, m, o), mirrored, out)
        return out, jnp.where(mirror, labels["mirror_action"], action)

    def route_detours(self, state: VLReachState) -> jax.Array:
        """Whether the expert's route to the target bends around another object (its next waypoint is not the
        target): at reset, the scenes where the straight reach would pass too close to something first."""
        return jnp.linalg.norm(self.target_plan(state).waypoint - state.object_pos[state.target]) > 1e-4

    def expert_action(self, state: VLReachState, goal: jax.Array | None = None) -> jax.Array:
        """Privileged scripted action [action_dim] toward the target (or object `goal`); extra dims 0."""
        goal = state.target if goal is None else goal
        velocity = goal_velocity(state, goal, self.touch_radius, self.max_speed, self.effector_bounds,
                                 margin=self.detour_margin, side_bias=self.detour_bias)
        return jnp.zeros((self.action_dim,), jnp.float32).at[:2].set(velocity)

    def language(self, state: VLReachState) -> tuple[jax.Array, jax.Array]:
        """The instruction's token ids [L] and mask [L]: the template filled with the target's words."""
        return fill_instruction(
            jnp.asarray(self._template_ids), jnp.asarray(self._template_mask), state.template,
            state.object_colour[state.target], state.object_shape[state.target],
        )

    def instruction(self, state: VLReachState) -> str:
        """The instruction of a single (unbatched) state as text (host side)."""
        ids, mask = jax.device_get(self.language(state))
        return self.tokenizer().decode(np.asarray(ids)[None], np.asarray(mask)[None])[0]

    def state_from_layout(
        self,
        object_pos: Sequence[Sequence[float]],
        object_colour: Sequence[int],
        object_shape: Sequence[int],
        target: int,
        effector: Sequence[float],
        template: int = 0,
        time: int = 0,
    ) -> VLReachState:
        """A hand-made state (tests, docs): positions in table units, colour/shape as indices."""
        if not 0 <= template < len(self.templates):
            raise ValueError(f"template must be in [0, {len(self.templates)}), got {template}")
        return VLReachState(
            effector=jnp.asarray(effector, jnp.float32),
            velocity=jnp.zeros((2,), jnp.float32),
            object_pos=jnp.asarray(object_pos, jnp.float32),
            object_colour=jnp.asarray(object_colour, jnp.int32),
            object_shape=jnp.asarray(object_shape, jnp.int32),
            target=jnp.int32(target),
            template=jnp.int32(template),
            time=jnp.int32(time),
        )


def expert_action(state: VLReachState, env: VLReach | None = None) -> jax.Array:
    """The scripted expert's action for a state of `env` (default: VLReach()'s geometry)."""
    return (VLReach() if env is None else env).expert_action(state)
