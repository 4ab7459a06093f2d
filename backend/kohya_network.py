"""The network topic of the kohya_ss import: LoRA_type (or network_module and network_args) -> network.type.

It holds `map_network` and its helpers, called by backend.kohya through backend.kohya_rules: the
LoRA_type / network_module / network_args `algo=` mapping to a Lathe network.type (with conv_dim and
dora_wd able to change it), refusing the types Lathe does not train ((IA)^3, GLoRA, DyLoRA, OFT...);
network_dim/network_alpha, conv_dim/conv_alpha, factor, use_tucker/use_cp, decompose_both, dropout,
rank_dropout, module_dropout, dora_wd/wd_on_output, network_weights; and the warnings for LyCORIS settings Lathe does not have.
"""

from __future__ import annotations

import shlex
from typing import TYPE_CHECKING, Any

from backend.config import DoRANetwork, LoConNetwork, LoHaNetwork, LoKrNetwork, LoRANetwork
from backend.kohya_keys import (
    GUI_NETWORK_ARGS,
    LATHE_NETWORKS,
    LYCORIS,
    LYCORIS_ALGOS,
    LYCORIS_UNSUPPORTED,
    NETWORK_ARG_NAMES,
    NETWORK_KINDS,
    NETWORK_MODULES,
    NOT_IMPORTED,
    NOT_TRAINED,
    is_set,
    show,
    to_bool,
    to_float,
    to_int,
    to_str,
)

if TYPE_CHECKING:
    from backend.kohya import Mapper


_NETWORKS = {"lora": LoRANetwork, "locon": LoConNetwork, "loha": LoHaNetwork, "lokr": LoKrNetwork, "dora": DoRANetwork}
_OWNED = ("LoRA_type", "network_module", "network_args", "network_dim", "network_alpha", "network_dropout",
          "network_weights", "lora_network_weights")
_REFUSED = "not imported: the config is refused"
_EMPTY = "not applicable: empty in the kohya file, so Lathe's default is kept"
_TARGETS = ("Lathe trains network.target_modules in the transformer blocks, plus the ResNet, downsample and upsample "
            "blocks when conv_rank > 0; LyCORIS's full preset also trains conv_in, conv_out and the time embedding")


def _skip_network(m: Mapper) -> None:
    """A refused config: its network keys say so (the rest are listed by backend.kohya)."""
    for key in (*_OWNED, *sorted(set().union(*GUI_NETWORK_ARGS.values())), "dim_from_weights", "train_on_input"):
        m.skip(key, _REFUSED)


def _holds(ltype: str, name: str) -> bool:
    return name in _NETWORKS[ltype].model_fields


def _default(ltype: str, name: str) -> Any:
    return _NETWORKS[ltype].model_fields[name].default


def _most(ltype: str, name: str) -> int:
    return next(c.le for c in _NETWORKS[ltype].model_fields[name].metadata if hasattr(c, "le"))


class _Net:
    """The network settings of one config: a network_args entry wins over the GUI field of the same name,
    and a GUI field counts only when kohya_ss passes it to the config's network module (`gui`)."""

    def __init__(self, m: Mapper, args: dict[str, str], gui: set[str]) -> None:
        self.m, self.args, self.gui = m, args, gui

    def pick(self, name: str, conv: Any, gui_key: str = "") -> tuple[Any, str | None]:
        """(value, kohya key) of setting `name`; the key is None when the config does not set it for this type."""
        key = gui_key or name
        here = key in self.gui and key in self.m.data and key not in self.m.done
        if name in self.args:
            text = self.args.pop(name)
            if here:
                self.m.skip(key, f"not applicable: network_args {name}= takes precedence")
            try:
                return conv(text), "network_args"
            except ValueError as e:
                self.m.error(f"network_args: {name}: {e}")
                return None, None
        return (self.m.get(key, conv), key) if here else (None, None)

    def drop(self, key: str, name: str, value: Any, reason: str, warn: bool = False) -> None:
        """A value that is not carried, listed with its reason; `warn` when kohya_ss would have used it."""
        if key != "network_args":
            self.m.skip(key, reason, warn)
            return
        self.m.res.unmapped.append((f"network_args {name}", reason))
        if warn:
            self.m.warn(f"network_args {name}: {reason}; the value {show(value)} is not imported")

    def empty(self, key: str | None) -> None:
        if key and key != "network_args":
            self.m.skip(key, _EMPTY)


def _network_args(m: Mapper) -> dict[str, str]:
    """sd-scripts' network_args ("conv_dim=4 algo=lokr", or a list of NAME=VALUE), when a config has them."""
    if "network_args" not in m.data:
        return {}
    raw = m.data["network_args"]
    tokens: list[str] = []
    try:
        for item in raw if isinstance(raw, list) else [raw]:
            tokens += shlex.split(to_str(item) or "")
    except ValueError as e:
        m.error(f"network_args: cannot read {show(raw)} as NAME=VALUE arguments ({e})")
        m.done.add("network_args")
        return {}
    args = {}
    for token in tokens:
        name, sep, value = (part.strip() for part in token.partition("="))
        if sep and name:
            args[name] = value
        else:
            m.error(f"network_args: {token!r} is not NAME=VALUE")
    if not tokens:
        m.mapped("network_args", "network (no extra arguments)")
    return args


def _network_kind(m: Mapper, args: dict[str, str]) -> tuple[str, str, str, str] | None:
    """(kohya_ss's network module, Lathe type, the kohya key that says so, its label); None when refused."""
    lora_type, module = m.get("LoRA_type", to_str), m.get("network_module", to_str)
    if lora_type is None and module is not None:
        key, label, ltype = "network_module", f"network_module {module!r}", NETWORK_MODULES.get(module)
        m.skip("LoRA_type", "not applicable: empty, so network_module decides")
        if ltype is None:
            m.skip(key, f"unsupported feature: the network module {module}")
            m.res.refused = f"{label}: not a network that Lathe trains; Lathe trains {LATHE_NETWORKS}"
            return None
    else:
        key, label = "LoRA_type", f"LoRA_type {lora_type or 'Standard'!r}"
        kind = NETWORK_KINDS.get(lora_type or "Standard")
        if kind is None:
            what = NOT_TRAINED.get(lora_type or "", lora_type)
            m.skip(key, f"unsupported feature: {what} networks")
            m.res.refused = f"{label}: {what} networks are not trained by Lathe; Lathe trains {LATHE_NETWORKS}"
            return None
        module, ltype = kind
        m.skip("network_module", "not applicable: LoRA_type decides kohya_ss's network module")
    algo = args.pop("algo", None) if module == LYCORIS else None
    if algo is not None:
        a = algo.strip().lower()
        if a in NOT_TRAINED:
            m.res.refused = (f"{label} with network_args algo={algo}: {NOT_TRAINED[a]} networks are not trained by "
                             f"Lathe; Lathe trains {LATHE_NETWORKS}")
            return None
        if a not in LYCORIS_ALGOS:
            m.error(f"network_args: algo={algo} is not a LyCORIS algorithm Lathe trains (lora, locon, loha, lokr)")
        elif lora_type and LYCORIS_ALGOS[a] != ltype:
            m.error(f"network_args: algo={algo} is another network than {label}")
        else:
            ltype = LYCORIS_ALGOS[a]
            m.mapped("network_args", f"network.type (algo={a})")
    return module, ltype, key, label


def _type_note(module: str, ltype: str, final: str) -> str:
    if final == "dora":
        return "LyCORIS locon with dora_wd: LoRA with DoRA's weight decomposition"
    if ltype != final:
        return ("conv_dim in network_args: kohya's LoCon (networks.lora with convolution layers)" if final == "locon"
                else "conv_dim is 0: no convolution layers, so a plain LoRA")
    if module == LYCORIS:
        return f"LyCORIS {ltype}"
    return {"networks.loha": "sd-scripts' own LoHa", "networks.lokr": "sd-scripts' own LoKr",
            "networks.lora": "kohya's LoCon: networks.lora with convolution layers" if ltype == "locon" else "",
            "networks.lora_flux": "sd-scripts' Flux.1 LoRA (networks.lora_flux)",
            "networks.lora_sd3": "sd-scripts' SD3 LoRA (networks.lora_sd3)"}[module]


def map_network(m: Mapper) -> None:
    """LoRA_type (or network_module and network_args) -> network.type, and every network value into its field.

    A value that the Lathe type cannot hold is listed and, when kohya_ss would have used it, also a warning."""
    args = {} if m.res.refused else _network_args(m)
    kind = None if m.res.refused else _network_kind(m, args)
    if kind is None:
        _skip_network(m)
        return
    module, ltype, type_key, label = kind
    net = _Net(m, args, GUI_NETWORK_ARGS[(module, ltype)])
    conv, conv_key = net.pick("conv_dim", to_int)
    if conv is not None and conv < 0:
        m.error(f"{conv_key}: conv_dim must be 0 (no convolution layers) or more; got {conv}")
    dora, dora_key = net.pick("dora_wd", to_bool) if module == LYCORIS else (None, None)
    final = ltype
    if module == "networks.lora" and ltype == "lora" and conv_key == "network_args" and (conv or 0) > 0:
        final = "locon"
    elif ltype == "locon" and dora:
        final = "dora"
    elif ltype == "locon" and conv == 0:
        final = "lora"
    elif dora:
        what = {"loha": "LoHa", "lokr": "LoKr"}[ltype]
        m.skip(type_key, f"unsupported feature: a weight-decomposed (DoRA) {what}")
        m.res.refused = (f"{label} with dora_wd: a weight-decomposed (DoRA) {what} is not trained by Lathe; "
                         f"Lathe trains {LATHE_NETWORKS}")
        _skip_network(m)
        return
    if type_key in m.data and type_key not in m.done:
        m.put(type_key, "network.type", final, _type_note(module, ltype, final))
    m.set("network.type", final)
    if dora_key and dora:
        m.put(dora_key, "network.type", "dora")
    elif dora_key:
        net.drop(dora_key, "dora_wd", dora, "not applicable: off")
    _map_sizes(m, net, final, conv, conv_key)
    _map_dropout(m, net, module, final)
    _map_lycoris(m, net, module, final)
    _map_weights(m)
    for name in [n for n in args if n.startswith("loraplus_")]:  # sd-scripts' networks read LoRA+ from here too
        if name in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"):
            text = args.pop(name)
            try:
                value = to_float(text)
            except ValueError as e:
                m.error(f"network_args: {name}: {e}")
                continue
            m.put("network_args", f"optimizer.{name}", value or None)
    for name, value in args.items():  # what no handler read
        if name in NETWORK_ARG_NAMES or name in LYCORIS_UNSUPPORTED:  # LyCORIS's were read when it is LyCORIS
            net.drop("network_args", name, value, f"not applicable: {module} does not read it for {label}")
        elif name in NOT_IMPORTED:
            reason, warn = NOT_IMPORTED[name]
            net.drop("network_args", name, value, reason, warn and is_set(name, value))
        else:
            net.drop("network_args", name, value, "unknown kohya_ss setting: a network argument this importer does not "
                     "know", True)
    m.skip("network_args", "not imported: none of its arguments (each is listed as network_args NAME)")


def _map_sizes(m: Mapper, net: _Net, final: str, conv: int | None, conv_key: str | None) -> None:
    """network_dim/network_alpha, conv_dim/conv_alpha, Tucker and the LoKr factor."""
    rank = m.get("network_dim", to_int)
    too_big = set()
    for key, value, field in (("network_dim", rank, "rank"), (conv_key, conv, "conv_rank")):
        if key and value is not None and final == "lokr" and value > _most("lokr", field):
            most = _most("lokr", field)
            m.error(f"{key}: must be at most {most}; got {value} (Lathe's network.{field}). LyCORIS reads a LoKr "
                    f"dimension this large as 'keep the Kronecker factors whole'; Lathe keeps a factor whole when the rank "
                    f"is at least half its larger side, so {most} keeps every factor up to {2 * most} wide whole")
            too_big.add(field)
            m.done.add(key)
    if rank is not None and "rank" not in too_big:
        m.put("network_dim", "network.rank", rank)
    net.empty("network_dim" if "network_dim" in m.data else None)
    alpha = m.get("network_alpha", to_float)
    if alpha == 0:
        m.put("network_alpha", "network.alpha", float(rank or _default(final, "rank")), "0 means alpha = network_dim in kohya_ss")
    elif alpha is not None:
        m.put("network_alpha", "network.alpha", alpha)
    net.empty("network_alpha" if "network_alpha" in m.data else None)
    conv_alpha, alpha_key = net.pick("conv_alpha", to_float)
    live = 0
    if not _holds(final, "conv_rank"):  # a plain LoRA: conv_dim was 0 (or is not passed for this type)
        if conv_key:
            net.drop(conv_key, "conv_dim", conv, "not applicable: 0, no convolution layers" if conv == 0 else _EMPTY)
        if alpha_key:
            net.drop(alpha_key, "conv_alpha", conv_alpha, "not applicable: conv_dim is 0 (no convolution layers)")
    else:
        if conv is not None and conv_key and "conv_rank" not in too_big:
            m.put(conv_key, "network.conv_rank", conv)
        net.empty(conv_key)
        live = conv if conv is not None else _default(final, "conv_rank")
        if alpha_key and conv_alpha is not None and not live:
            net.drop(alpha_key, "conv_alpha", conv_alpha, "not applicable: conv_dim is 0 (no convolution layers)")
        elif alpha_key and conv_alpha == 0:
            m.put(alpha_key, "network.conv_alpha", float(live), "0 means conv_alpha = conv_dim in kohya_ss")
        elif alpha_key and conv_alpha is not None:
            m.put(alpha_key, "network.conv_alpha", conv_alpha)
        net.empty(alpha_key)
    _map_tucker(m, net, final, live)
    for name, field, conv_fn in (("factor", "lokr_factor", to_int), ("decompose_both", "decompose_both", to_bool)):
        value, key = net.pick(name, conv_fn)
        if key and value is not None and _holds(final, field):
            m.put(key, f"network.{field}", value, "automatic" if field == "lokr_factor" and value == -1 else "")
        elif key and value is not None:
            net.drop(key, name, value, f"not applicable: a LoKr setting, and this is {final}")
        net.empty(key)


def _map_tucker(m: Mapper, net: _Net, final: str, live: int) -> None:
    """use_tucker, or use_cp (its older name in LyCORIS and kohya_ss): either one on turns it on."""
    given = [(value, key, name) for name in ("use_tucker", "use_cp") for value, key in [net.pick(name, to_bool)] if key]
    on = any(value for value, _, _ in given)
    for value, key, name in given:
        if value is None:
            net.empty(key)
        elif on and not live:
            net.drop(key, name, value, "not applicable: Tucker decomposition applies to the 3x3 convolutions, and "
                     "conv_dim is 0")
        elif _holds(final, "use_tucker"):
            notes = ["use_cp is the older name of use_tucker"] if name == "use_cp" else []
            notes += ["either one on turns it on"] if value != on else []
            m.put(key, "network.use_tucker", on, "; ".join(notes))
        elif value:
            net.drop(key, name, value, f"unsupported feature: Tucker decomposition on {final} networks (Lathe has it "
                     "on loha and lokr)", warn=True)
        else:
            net.drop(key, name, value, "not applicable: off")


_LYCORIS_RANK_DROPOUT = (
    "LyCORIS's rank dropout is another formula than sd-scripts' networks.lora's, which Lathe's network.rank_dropout "
    "is: LyCORIS (in its default, non-bypass mode) zeroes rows of the whole update weight with one mask per forward "
    "call, rescaled only with rank_dropout_scale; Lathe zeroes ranks of the down projection's output with a mask per "
    "image and rescales by 1/(1-p): the regularization is not the same")


def _map_dropout(m: Mapper, net: _Net, module: str, final: str) -> None:
    """network_dropout, rank_dropout and module_dropout. sd-scripts hands network_dropout to its own
    networks (networks.lora, loha, lokr) as neuron_dropout; LyCORIS (lycoris.kohya) does not read that
    name and applies its own dropout= only in bypass mode, so a LyCORIS config trains without dropout."""
    value, key = net.pick("dropout", to_float) if module == LYCORIS else (None, None)
    if key and "network_dropout" in m.data:
        m.skip("network_dropout", "not applicable: network_args dropout= takes precedence")
    elif "network_dropout" in m.data:
        value, key = m.get("network_dropout", to_float), "network_dropout"
    if key and value and module == LYCORIS:
        net.drop(key, "dropout", value, "not applicable: LyCORIS trains without it (sd-scripts passes network_dropout "
                 "as neuron_dropout, which LyCORIS does not read, and LyCORIS applies dropout= only in bypass mode), so "
                 "network.dropout stays 0 to train as kohya_ss does", warn=True)
    elif key and value is not None and _holds(final, "dropout"):
        m.put(key, "network.dropout", value)
    elif key and value:
        net.drop(key, "dropout", value, f"unsupported feature: dropout on {final} networks (Lathe's network.dropout is "
                 "on lora, locon and dora)", warn=True)
    elif key and value is not None:
        net.drop(key, "dropout", value, "not applicable: 0, no dropout")
    net.empty(key)
    for name in ("rank_dropout", "module_dropout"):
        value, key = net.pick(name, to_float)
        if not key or value is None:
            net.empty(key)
        elif not value:
            net.drop(key, name, value, "not applicable: 0, no dropout")
        elif not _holds(final, name):
            net.drop(key, name, value, f"unsupported feature: {name.replace('_', ' ')} on {final} networks (Lathe's "
                     "network.rank_dropout is on lora, locon and dora)", warn=True)
        else:
            note = ""
            if name == "rank_dropout" and module == LYCORIS:
                note = "LyCORIS's rank dropout differs (see the warning)"
                m.warn(f"{'network_args rank_dropout' if key == 'network_args' else key}: {_LYCORIS_RANK_DROPOUT}")
            m.put(key, f"network.{name}", value, note)


def _map_lycoris(m: Mapper, net: _Net, module: str, final: str) -> None:
    """The LyCORIS-only settings: the DoRA axis, module presets, and the switches Lathe does not have."""
    wd, wd_key = net.pick("wd_on_output", to_bool)
    if final == "dora" and wd is False:
        m.put(wd_key or "", "network.type", "dora", "wd_on_output=False: the input axis, as Lathe's dora")
    elif final == "dora":
        m.warn("dora_wd: LyCORIS normalizes DoRA's weight on the output axis (wd_on_output "
               f"{'true' if wd_key else 'is absent, so true'}); Lathe's dora normalizes on the input axis (wd_on_output "
               "false), the axis that A1111 and ComfyUI both read the same way: the trained network is not the same")
        if wd_key:
            net.drop(wd_key, "wd_on_output", wd, "unsupported feature: DoRA on the output axis (Lathe's dora "
                     "normalizes on the input axis)")
    elif wd_key:
        net.drop(wd_key, "wd_on_output", wd, "not applicable: a DoRA setting")
    if module != LYCORIS:
        return
    preset, preset_key = net.pick("preset", to_str, "LyCORIS_preset")
    if preset:
        net.drop(preset_key or "", "preset", preset, f"unsupported feature: LyCORIS module presets ({_TARGETS})", warn=True)
    net.empty(preset_key)
    for name, what in LYCORIS_UNSUPPORTED.items():
        value, key = net.pick(name, to_bool)
        if key and value:
            net.drop(key, name, value, f"unsupported feature: {what}", warn=True)
        elif key and value is not None:
            net.drop(key, name, value, "not applicable: off")
        net.empty(key)


def _map_weights(m: Mapper) -> None:
    """network_weights (lora_network_weights in older kohya_ss): a LoRA file to start from; empty = none."""
    given = {k: m.get(k, to_str) for k in ("network_weights", "lora_network_weights") if k in m.data}
    chosen = next((k for k, v in given.items() if v), None)
    if chosen:
        m.put(chosen, "network.network_weights", given[chosen], "the run starts from this file's weights")
        if m.get("dim_from_weights", to_bool):
            m.skip("dim_from_weights", "unsupported feature: reading network_dim from network_weights; network.rank "
                   "must match the file's rank", warn=True)
    for key, value in given.items():
        if key == chosen or key in m.done:
            continue
        if value:
            m.skip(key, f"not applicable: {chosen} takes precedence", warn=value != given[chosen or key])
        elif chosen:
            m.skip(key, f"not applicable: empty ({chosen} is set)")
        else:
            m.put(key, "network.network_weights", None, "empty: fresh weights")
