"""A cheap off-screen MuJoCo camera for Meta-World (or any MuJoCo model), headless.

Why not gymnasium's `MujocoRenderer` (what Meta-World's `render()` uses):
  * cost: Meta-World's models ask for a 4096 shadow map and 4x multisampling;
    on a CPU (llvmpipe) that is ~93 ms a frame. Shadows, reflections and
    off-screen samples off: 130-155 frames/s at 64-128 px on one core;
  * several envs in one process: each renderer owns a GL context, and only the
    current one draws; `render` here makes its own context current every time,
    so N envs stepped in turn each get their own frame, and releases it after,
    so the next frame may come from another thread (EGL refuses a context that
    is still current in another thread);
  * orientation: Meta-World's "corner" cameras are mounted rolled by 180
    degrees (their image-up axis points at the floor), so their frames come
    out upside down. `CameraRenderer` rotates such frames by 180 degrees (a
    rotation, not a vertical flip, which would also mirror left and right),
    decided from the camera's pose, so cameras that are mounted upright
    ("topview", "behindGripper", "gripperPOV") stay as they are;
  * the backend: mujoco picks its GL backend from MUJOCO_GL when it is first
    imported (glfw by default, which needs a display). This module builds its
    GL context from the backend modules directly (EGL, then OSMesa) and says
    which it tried and which Debian package provides each when none starts.

Frames are uint8 [H, W, 3], row 0 at the top of the picture.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import numpy as np

# MUJOCO_GL value -> (mujoco module providing GLContext, what provides the library)
GL_BACKENDS: dict[str, tuple[str, str]] = {
    "egl": ("mujoco.egl", "libEGL with a Mesa driver: Debian packages libegl1 libegl-mesa0 libgl1-mesa-dri"),
    "osmesa": ("mujoco.osmesa", "libOSMesa: Debian package libosmesa6"),
}
DEFAULT_BACKEND_ORDER = ("egl", "osmesa")
_context_class: Any = None  # the GLContext class of the backend that started (one per process)
_backend: str | None = None  # its MUJOCO_GL name


class RenderError(RuntimeError):
    """No MuJoCo GL backend could start (names the ones tried and their packages)."""


def backend_order(env: dict | None = None) -> tuple[str, ...]:
    """The backends to try: MUJOCO_GL alone when it names one of ours, else EGL then OSMesa."""
    chosen = (env if env is not None else os.environ).get("MUJOCO_GL", "").strip().lower()
    return (chosen,) if chosen in GL_BACKENDS else DEFAULT_BACKEND_ORDER


def gl_context_class(order: tuple[str, ...] | None = None) -> Any:
    """The GLContext class of the first backend that imports and opens a 1x1 context.

    PyOpenGL binds one platform per process (PYOPENGL_PLATFORM), so after one
    backend got as far as importing OpenGL the others usually cannot start in
    the same process; the error then says to choose one with MUJOCO_GL.
    """
    global _context_class, _backend
    if _context_class is not None:
        return _context_class
    order = backend_order() if order is None else order
    failures = []
    for name in order:
        module_name, package = GL_BACKENDS[name]
        try:
            cls = importlib.import_module(module_name).GLContext
            probe = cls(1, 1)
            probe.make_current()
            probe.free()
        except Exception as err:  # noqa: BLE001 - every failure is reported below
            failures.append(f"MUJOCO_GL={name} ({package}): {type(err).__name__}: {err}")
            continue
        os.environ.setdefault("MUJOCO_GL", name)
        _context_class, _backend = cls, name
        return cls
    raise RenderError(
        "cannot start MuJoCo rendering; tried " + "; ".join(failures)
        + ". Install one of those packages, or set MUJOCO_GL to a backend that works here before starting Python"
    )


def release_current() -> None:
    """Leave no context current in this thread (EGL: a context current in one thread cannot be made
    current in another, and the async trainer resets an env in one thread and steps it in a collector's)."""
    if _backend == "egl":
        egl = importlib.import_module("mujoco.egl")
        egl.EGL.eglMakeCurrent(egl.EGL_DISPLAY, egl.EGL.EGL_NO_SURFACE, egl.EGL.EGL_NO_SURFACE, egl.EGL.EGL_NO_CONTEXT)


def camera_names(model: Any) -> list[str]:
    """The names of the model's fixed cameras, in id order."""
    import mujoco

    return [mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_CAMERA, i) for i in range(model.ncam)]


def camera_id(model: Any, name: str) -> int:
    """The id of camera `name`; an unknown name lists the model's cameras."""
    names = camera_names(model)
    if name not in names:
        raise ValueError(f"env.camera: unknown camera {name!r}; this model's cameras are {', '.join(names)}")
    return names.index(name)


def camera_is_rolled(data: Any, cam: int) -> bool:
    """Whether camera `cam` shows the world upside down: its image-up axis points below the horizon."""
    up = np.asarray(data.cam_xmat[cam]).reshape(3, 3)[:, 1]  # columns: the camera's x, y (up), z axes
    return bool(up[2] < 0.0)


def make_cheap(model: Any, width: int, height: int) -> None:
    """Model visual settings for fast CPU rendering (before any MjrContext of it is made)."""
    model.vis.quality.shadowsize = 0
    model.vis.quality.offsamples = 0
    model.vis.global_.offwidth = max(int(model.vis.global_.offwidth), width)
    model.vis.global_.offheight = max(int(model.vis.global_.offheight), height)


class CameraRenderer:
    """One fixed camera of one model, with its own GL context (see module docstring)."""

    def __init__(self, model: Any, camera: str, width: int = 64, height: int = 64, max_geom: int = 2000):
        import mujoco

        self._mj = mujoco
        self.model = model
        self.camera = camera
        self.camera_id = camera_id(model, camera)
        self.width, self.height = int(width), int(height)
        make_cheap(model, self.width, self.height)
        self._context = gl_context_class()(self.width, self.height)
        self._context.make_current()
        self._mjr = mujoco.MjrContext(model, mujoco.mjtFontScale.mjFONTSCALE_150)
        mujoco.mjr_setBuffer(mujoco.mjtFramebuffer.mjFB_OFFSCREEN, self._mjr)
        release_current()
        self._scene = mujoco.MjvScene(model, maxgeom=max_geom)
        self._scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        self._scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        self._option = mujoco.MjvOption()
        self._cam = mujoco.MjvCamera()
        self._cam.type = mujoco.mjtCamera.mjCAMERA_FIXED
        self._cam.fixedcamid = self.camera_id
        self._rect = mujoco.MjrRect(0, 0, self.width, self.height)
        self._buffer = np.empty((self.height, self.width, 3), np.uint8)

    def render(self, data: Any) -> np.ndarray:
        """The camera's frame of `data` (a fresh uint8 [H, W, 3] array, upright)."""
        if self._mjr is None:
            raise RuntimeError("CameraRenderer.render after close")
        mj = self._mj
        self._context.make_current()  # several renderers in one process: draw into ours
        try:
            mj.mjv_updateScene(self.model, data, self._option, None, self._cam, mj.mjtCatBit.mjCAT_ALL, self._scene)
            mj.mjr_render(self._rect, self._scene, self._mjr)
            mj.mjr_readPixels(self._buffer, None, self._rect, self._mjr)  # OpenGL order: bottom row first
        finally:
            release_current()
        if camera_is_rolled(data, self.camera_id):
            return np.ascontiguousarray(self._buffer[:, ::-1])  # = the top-first frame rotated by 180 degrees
        return np.ascontiguousarray(self._buffer[::-1])

    def close(self) -> None:
        """Free the GL objects now (at interpreter exit PyOpenGL may be gone and __del__ would fail)."""
        if self._mjr is None:
            return
        self._context.make_current()
        self._mjr.free()
        self._mjr = None
        self._context.free()
        self._context = None
