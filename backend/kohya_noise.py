"""kohya_ss noise, timestep and loss settings -> Lathe's `training.*` (sd-scripts' own names).

kohya_ss passes these to sd-scripts as follows (kohya_gui/lora_gui.py), and the import does the same:
`noise_offset_type` Original passes noise_offset, adaptive_noise_scale and noise_offset_random_strength;
Multires passes multires_noise_iterations and multires_noise_discount; a file without the key (older GUIs,
sd-scripts' own shape) passes whatever it has. 0 means off for the offsets, the iterations,
ip_noise_gamma, v_pred_like_loss, min_timestep/max_timestep and scale_weight_norms; the Huber settings
matter only with loss_type huber or smooth_l1, a random strength only with its strength.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from backend.kohya_keys import UNSET, off, real, show, to_bool, to_float, to_int, to_str

if TYPE_CHECKING:
    from backend.kohya import Mapper

OFFSET_KEYS = ("noise_offset", "adaptive_noise_scale", "noise_offset_random_strength")
MULTIRES_KEYS = ("multires_noise_iterations", "multires_noise_discount")
# kohya key -> its converter; the Lathe setting is training.<key> (0 or "" -> empty where off() wraps it).
DIRECT: dict[str, Callable[[Any], Any]] = {
    "ip_noise_gamma": off(to_float),
    "min_timestep": off(to_int),
    "debiased_estimation_loss": to_bool,
    "scale_v_pred_loss_like_noise_pred": to_bool,
    "v_pred_like_loss": off(to_float),
    "zero_terminal_snr": to_bool,
    "scale_weight_norms": off(to_float),
}
LOSS_TYPES = ("l2", "huber", "smooth_l1", "l1")
HUBER_KEYS = {"huber_c": to_float, "huber_scale": to_float, "huber_schedule": to_str}
EMPTY = "not applicable: empty in the kohya file, so Lathe's default is kept"


def _put(m: Mapper, key: str, conv: Callable[[Any], Any], value: Any = None) -> Any:
    """training.<key> from the kohya key (already converted when `value` is given); its value."""
    value = m.get(key, conv) if value is None else value
    if value is UNSET:
        m.put(key, f"training.{key}", None)
    elif value is not None:
        m.put(key, f"training.{key}", value)
    m.skip(key, EMPTY)
    return value


def map_noise(m: Mapper) -> None:
    """Every noise, timestep and loss key of the file (see the module docstring)."""
    raw = m.get("noise_offset_type", to_str)
    kind = raw.lower() if raw else None
    if kind not in (None, "original", "multires"):
        m.error(f"noise_offset_type: expected Original or Multires; got {show(m.data['noise_offset_type'])}")
        for key in (*OFFSET_KEYS, *MULTIRES_KEYS):
            m.skip(key, "not imported: noise_offset_type is not understood (see the errors)")
    if kind is not None and "noise_offset_type" in m.data:
        m.mapped("noise_offset_type", f"training.{'noise_offset' if kind == 'original' else 'multires_noise_*'} "
                 f"(type {raw})")
    for key in OFFSET_KEYS if kind == "multires" else MULTIRES_KEYS if kind == "original" else ():
        m.skip(key, f"not applicable: kohya_ss passes it only when noise_offset_type is "
               f"{'Original' if kind == 'multires' else 'Multires'}")
    offset = m.get("noise_offset", off(to_float))
    _put(m, "noise_offset", to_float, 0.0 if offset is UNSET else offset)  # Lathe's "off" is 0, not empty
    _put(m, "adaptive_noise_scale", off(to_float))
    _strength(m, "noise_offset_random_strength", real(offset), "noise_offset")
    iterations = m.get("multires_noise_iterations", off(to_int))
    if iterations is not None:
        m.put("multires_noise_iterations", "training.multires_noise_iterations", iterations if real(iterations) else 0)
    if real(iterations):
        _put(m, "multires_noise_discount", to_float)
    m.skip("multires_noise_discount", "not applicable: only used with multires_noise_iterations")
    m.skip("multires_noise_iterations", EMPTY)
    values = {key: _put(m, key, conv) for key, conv in DIRECT.items()}
    _strength(m, "ip_noise_gamma_random_strength", real(values["ip_noise_gamma"]), "ip_noise_gamma")
    top = m.get("max_timestep", off(to_int))
    _put(m, "max_timestep", to_int, UNSET if top == 1000 else top)  # 1000: the whole schedule, Lathe's empty
    _map_loss_type(m)


def _strength(m: Mapper, key: str, strength_on: bool, strength: str) -> None:
    """A random-strength switch: carried when its strength is on, else not used."""
    if strength_on:
        _put(m, key, to_bool)
    m.skip(key, f"not applicable: only used with {strength}")


def _map_loss_type(m: Mapper) -> None:
    name = m.get("loss_type", to_str)
    huber = False
    if name and name.lower() in LOSS_TYPES:
        m.put("loss_type", "training.loss_type", name.lower())
        huber = name.lower() in ("huber", "smooth_l1")
    elif name:
        m.error(f"loss_type: expected one of {', '.join(LOSS_TYPES)}; got {name!r}")
    m.skip("loss_type", EMPTY)
    for key, conv in HUBER_KEYS.items():
        if huber:
            value = m.get(key, conv)
            _put(m, key, conv, value.lower() if key == "huber_schedule" and value else value)
        m.skip(key, "not applicable: only used with loss_type huber or smooth_l1")
