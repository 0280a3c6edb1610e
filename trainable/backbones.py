"""Backbones and their weights: the backbone name's prefix picks a source from `BACKBONE_SOURCES`.

  densenet121, resnet50.a1_in1k, ...  a timm model name
  hf-hub:ORG/NAME                      a timm model on the Hugging Face hub (its config.json and weights)
  local-dir:/PATH (or a plain folder)  the same in a local folder, the hub's layout: config.json + model.safetensors
  xrv:WEIGHTS                          a torchxrayvision chest X-ray network, e.g. xrv:densenet121-res224-chex

`pretrained` says where the weights come from:
  none      the architecture, randomly initialised
  imagenet  the weights the backbone name comes with: timm's pretrained (ImageNet) weights for a timm name, the
            repository's or folder's weights for hf-hub:/local-dir:, torchxrayvision's released chest X-ray
            weights for xrv: (the presets' default, so a backbone arm compares pretraining sources as they ship)
  PATH      a local weights file (safetensors, or a torch state dict read with weights_only=True)

Every weights file or downloaded state dict is loaded strictly (all backbone keys, right shapes): an empty
file, random bytes or another model's weights are errors naming the file, never a silent fallback to other
weights. `check_pretrained` runs before any trial: it fails within seconds, with the fix, when the weights are
neither local nor reachable (no minute of download retries), then loads them once.
"""
from __future__ import annotations

import os
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.models import load_state_dict, resolve_model_input_args
from torch import nn

from .errors import ConfigError

HUB_WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")    # a hub repository's weights, preferred first
PROBE_TIMEOUT_S = 5          # one HEAD request: long enough for a slow proxy, far below the hub's retry loop
OFFLINE_FIX = "offline, pass a local weights file as pretrained=/path/to/weights.safetensors, or pretrained=none"


def one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[:limit] + "..."


# --- weights files ----------------------------------------------------------------------------------------------

def _weights_format(path: Path) -> str:
    """'safetensors' or 'torch', from the file's first bytes; anything else is not a weights file."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(9)
        size = path.stat().st_size
    except OSError as err:
        raise ConfigError(f"pretrained={str(path)!r}: cannot read weights file ({err.strerror or err})") from None
    if not head:
        raise ConfigError(f"pretrained={str(path)!r}: empty file, not a weights file")
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < size:
        return "safetensors"              # an 8-byte header length, then the JSON header
    if zipfile.is_zipfile(path) or head[:1] == b"\x80":
        return "torch"                    # torch.save's zip archive, or a legacy pickle
    raise ConfigError(f"pretrained={str(path)!r}: not a weights file (neither safetensors nor a PyTorch "
                      f"checkpoint)")


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict of tensors from a local file; a clear ConfigError naming the file for anything else."""
    path = Path(path)
    kind = _weights_format(path)
    try:
        if kind == "safetensors":
            from safetensors.torch import load_file
            state_dict = load_file(str(path), device="cpu")
        elif path.suffix == ".safetensors":
            raise ValueError("a PyTorch checkpoint named .safetensors; rename it to .pth")
        else:  # timm's reader: torch.load(weights_only=True), unwraps state_dict/model/EMA keys, strips 'module.'
            state_dict = load_state_dict(str(path))
    except (AttributeError, TypeError):       # timm's key clean-up met something that is not a mapping
        state_dict = None
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise ConfigError(f"pretrained={str(path)!r}: cannot read weights file ({one_line(err)})") from None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ConfigError(f"pretrained={str(path)!r}: not a state dict (expected a mapping of names to tensors)")
    if not state_dict:
        raise ConfigError(f"pretrained={str(path)!r}: holds no weights (an empty state dict)")
    return state_dict


def _timm_with_state_dict(kwargs: dict[str, Any], state_dict: dict[str, torch.Tensor], what: str) -> nn.Module:
    """A timm backbone loaded strictly from `state_dict` (its classifier removed).

    timm's own loading drops the strict key check when the classifier is removed (num_classes=0), so the state
    dict is handed over as `pretrained_cfg_overlay=dict(state_dict=...)`, with strict loading; timm still
    applies the model's checkpoint filter (e.g. position-embedding resampling) and the RGB -> grayscale stem fold.
    """
    classifiers = kwargs["pretrained_cfg"].get("classifier") or ()
    state_dict = dict(state_dict)
    for prefix in (classifiers,) if isinstance(classifiers, str) else classifiers:
        state_dict.pop(f"{prefix}.weight", None)
        state_dict.pop(f"{prefix}.bias", None)
    # source='' so timm takes the state dict, not the hub or folder that an hf-hub:/local-dir: config names
    overlay = dict(state_dict=state_dict, classifier=None, source="")
    try:
        backbone = timm.create_model(**kwargs, pretrained=True, pretrained_cfg_overlay=overlay)
    except (RuntimeError, KeyError, ValueError) as err:
        raise ConfigError(f"{what}: weights do not match backbone {kwargs['model_name']!r} ({one_line(err)})"
                          ) from None
    backbone.pretrained_cfg.pop("state_dict", None)  # don't keep a second copy of the weights alive
    return backbone


# --- reaching the hub ---------------------------------------------------------------------------------------------

def _hub_file_available(repo: str, filenames: tuple[str, ...], what: str) -> None:
    """Return if one of `filenames` of hub repo `repo` is in the local cache or the hub answers for it within
    PROBE_TIMEOUT_S; else a ConfigError with the fix. Never downloads and never retries."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError

    repo_id, _, revision = repo.partition("@")
    if any(isinstance(huggingface_hub.try_to_load_from_cache(repo_id, name, revision=revision or None), str)
           for name in filenames):
        return
    if huggingface_hub.is_offline_mode():
        raise ConfigError(f"{what}: {repo_id} ({' or '.join(filenames)}) is not in the local Hugging Face cache "
                          f"and HF_HUB_OFFLINE is set; {OFFLINE_FIX}")
    reason = "not found"
    for name in filenames:
        url = huggingface_hub.hf_hub_url(repo_id, name, revision=revision or None)
        try:
            huggingface_hub.get_hf_file_metadata(url, timeout=PROBE_TIMEOUT_S)
            return
        except (EntryNotFoundError, RepositoryNotFoundError) as err:
            reason = one_line(err, 160)
        except HfHubHTTPError as err:
            raise ConfigError(f"{what}: the Hugging Face hub refused {url} ({one_line(err, 160)})") from None
        except Exception as err:  # noqa: BLE001 - DNS, refused, timeout: the hub is out of reach
            raise ConfigError(f"{what}: cannot reach the Hugging Face hub for {repo_id} ({one_line(err, 160)}) and "
                              f"the weights are not in the local cache; {OFFLINE_FIX}") from None
    raise ConfigError(f"{what}: the hub has no {' or '.join(filenames)} in {repo_id} ({reason})")


def _url_available(url: str, cached: Path, what: str) -> None:
    """Return if `cached` exists or `url` answers a HEAD request within PROBE_TIMEOUT_S; else the fix."""
    if cached.is_file():
        return
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=PROBE_TIMEOUT_S).close()
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise ConfigError(f"{what}: cannot download {url} ({one_line(err, 160)}) and {cached} is not there; "
                          f"{OFFLINE_FIX}") from None


# --- sources ---------------------------------------------------------------------------------------------------------

def _what(cfg: Any) -> str:
    return f"backbone={cfg.backbone!r} pretrained={cfg.pretrained!r}"


def _timm_kwargs(name: str, cfg: Any) -> dict[str, Any]:
    # timm decides which models take img_size (fixed-size ViTs and friends resample their position embeddings).
    # The resolved pretrained_cfg is passed back so a tagged name (resnet50.a1_in1k) keeps its weights choice.
    kwargs = resolve_model_input_args(name, args={"img_size": cfg.image_size, "in_chans": 1})
    kwargs.update(num_classes=0, drop_rate=cfg.drop_rate)
    return kwargs


class TimmName:
    """A model of timm's registry; pretrained=imagenet is timm's own download (hub or URL)."""
    prefix = ""

    def validate(self, cfg: Any) -> None:
        if not timm.is_model(cfg.backbone):
            close = timm.list_models(f"*{cfg.backbone.split('_')[0]}*")[:10]
            hint = f" (similar: {', '.join(close)})" if close else ""
            raise ConfigError(f"config: backbone={cfg.backbone!r} is not a timm model name, nor hf-hub:ORG/NAME, "
                              f"local-dir:/FOLDER or xrv:WEIGHTS{hint}")

    def build(self, cfg: Any) -> nn.Module:
        kwargs = _timm_kwargs(cfg.backbone, cfg)
        if cfg.pretrained == "none":
            return timm.create_model(**kwargs, pretrained=False)
        if cfg.pretrained == "imagenet":
            self.check_reachable(cfg)
            try:
                return timm.create_model(**kwargs, pretrained=True)
            except (OSError, RuntimeError) as err:
                raise ConfigError(f"{_what(cfg)}: could not load timm's weights ({one_line(err)}); {OFFLINE_FIX}"
                                  ) from None
        return _timm_with_state_dict(kwargs, read_weights(cfg.pretrained), f"pretrained={cfg.pretrained!r}")

    def check_reachable(self, cfg: Any) -> None:
        if cfg.pretrained != "imagenet":
            return
        pretrained_cfg = resolve_model_input_args(cfg.backbone)["pretrained_cfg"]
        if pretrained_cfg.get("hf_hub_id"):
            named = pretrained_cfg.get("hf_hub_filename")
            _hub_file_available(pretrained_cfg["hf_hub_id"], (named,) if named else HUB_WEIGHTS_FILES, _what(cfg))
        elif pretrained_cfg.get("url"):
            url = pretrained_cfg["url"]
            _url_available(url, Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url), _what(cfg))
        else:
            raise ConfigError(f"{_what(cfg)}: timm has no pretrained weights for this model; use pretrained=none "
                              f"or a local weights file")


class HubModel:
    """hf-hub:ORG/NAME[@REVISION]: the architecture from the repository's config.json, weights from the repository."""
    prefix = "hf-hub:"

    def validate(self, cfg: Any) -> None:
        repo = cfg.backbone[len(self.prefix):]
        org, slash, name = repo.partition("/")
        if not (org and slash and name) or "/" in name or any(c.isspace() for c in repo):
            raise ConfigError(f"config: backbone={cfg.backbone!r}: expected hf-hub:ORG/NAME (a timm model "
                              f"repository on the Hugging Face hub, e.g. hf-hub:timm/densenet121.tv_in1k)")

    def _kwargs(self, cfg: Any) -> dict[str, Any]:
        self.check_reachable(cfg, config_only=True)
        try:
            return _timm_kwargs(cfg.backbone, cfg)
        except (OSError, RuntimeError, ValueError, KeyError) as err:
            raise ConfigError(f"{_what(cfg)}: cannot read the model's config.json ({one_line(err)})") from None

    def _published(self, cfg: Any) -> dict[str, torch.Tensor]:
        from timm.models._hub import load_state_dict_from_hf
        try:
            # model.safetensors, else pytorch_model.bin read with weights_only=True
            return load_state_dict_from_hf(cfg.backbone[len(self.prefix):], weights_only=True)
        except Exception as err:  # noqa: BLE001 - missing, unreadable: the fix is the same
            raise ConfigError(f"{_what(cfg)}: cannot load the repository's weights ({one_line(err)})") from None

    def build(self, cfg: Any) -> nn.Module:
        kwargs = self._kwargs(cfg)
        if cfg.pretrained == "none":
            return timm.create_model(**kwargs, pretrained=False)
        if cfg.pretrained == "imagenet":
            self.check_reachable(cfg)
            return _timm_with_state_dict(kwargs, self._published(cfg), f"{_what(cfg)}: the published weights")
        return _timm_with_state_dict(kwargs, read_weights(cfg.pretrained), f"pretrained={cfg.pretrained!r}")

    def check_reachable(self, cfg: Any, config_only: bool = False) -> None:
        repo = cfg.backbone[len(self.prefix):]
        _hub_file_available(repo, ("config.json",), _what(cfg))
        if cfg.pretrained == "imagenet" and not config_only:
            _hub_file_available(repo, HUB_WEIGHTS_FILES, _what(cfg))


class LocalFolder(HubModel):
    """local-dir:/FOLDER (or a plain folder path): a hub repository copied to disk, for air-gapped clusters."""
    prefix = "local-dir:"

    @staticmethod
    def folder(cfg: Any) -> Path:
        name = cfg.backbone
        return Path(name[len(LocalFolder.prefix):] if name.startswith(LocalFolder.prefix) else name).expanduser()

    def validate(self, cfg: Any) -> None:
        folder = self.folder(cfg)
        if not (folder / "config.json").is_file():
            raise ConfigError(f"config: backbone={cfg.backbone!r}: no config.json in {folder}; a local backbone "
                              f"is a folder in the Hugging Face hub's layout (config.json + model.safetensors)")
        if cfg.pretrained == "imagenet" and not any((folder / name).is_file() for name in HUB_WEIGHTS_FILES):
            raise ConfigError(f"config: backbone={cfg.backbone!r} pretrained='imagenet': no "
                              f"{' or '.join(HUB_WEIGHTS_FILES)} in {folder}; add it, pass a weights file as "
                              f"pretrained, or pretrained=none")

    def _kwargs(self, cfg: Any) -> dict[str, Any]:
        try:
            return _timm_kwargs(f"{self.prefix}{self.folder(cfg)}", cfg)
        except (OSError, RuntimeError, ValueError, KeyError) as err:
            raise ConfigError(f"{_what(cfg)}: cannot read {self.folder(cfg) / 'config.json'} ({one_line(err)})"
                              ) from None

    def _published(self, cfg: Any) -> dict[str, torch.Tensor]:
        return read_weights(next(self.folder(cfg) / name for name in HUB_WEIGHTS_FILES
                                 if (self.folder(cfg) / name).is_file()))

    def check_reachable(self, cfg: Any, config_only: bool = False) -> None:
        """Local: validate() already found the files."""


# torchxrayvision's DenseNet-121 and ResNet-50 weights -> the resolution they were trained at (its
# models.model_urls, checked equal in tests/test_models.py), here so that validating a config does not import
# torchxrayvision (seconds).
XRV_WEIGHTS = {"densenet121-res224-all": 224, "densenet121-res224-nih": 224, "densenet121-res224-pc": 224,
               "densenet121-res224-chex": 224, "densenet121-res224-rsna": 224, "densenet121-res224-mimic_nb": 224,
               "densenet121-res224-mimic_ch": 224, "resnet50-res512-all": 512}
# torchxrayvision weights trained on NIH ChestX-ray14 images (theirs, or RSNA's, which are NIH images), with
# torchxrayvision's own splits: pretraining on them leaks NIH validation/test images into the backbone.
XRV_SAW_NIH = ("densenet121-res224-all", "densenet121-res224-nih", "densenet121-res224-rsna", "resnet50-res512-all")
# torchxrayvision's input scale: xrv.utils.normalize maps [0, 255] to [-1024, 1024], i.e. (x/255 - 0.5) / (1/2048).
XRV_MEAN, XRV_STD = 0.5, 0.5 / 1024


class XrvBackbone(nn.Module):
    """A torchxrayvision network without its classifier: forward_features gives the last feature map.

    DenseNet-121: the `features` block and a ReLU (what xrv's features2 pools); ResNet-50: conv1 .. layer4. The
    head pools the map as torchxrayvision does. `pretrained_cfg` carries torchxrayvision's input scale, so
    `trainable.models.input_stats` feeds it images in [-1024, 1024], as xrv.utils.normalize(img, 255) would.
    """

    def __init__(self, kind: str, body: nn.Module, num_features: int, resolution: int) -> None:
        super().__init__()
        self.kind = kind
        if kind == "densenet":
            self.features = body
        else:
            self.model = body
        self.num_features = num_features
        self.pretrained_cfg = {"mean": (XRV_MEAN,), "std": (XRV_STD,), "input_size": (1, resolution, resolution)}

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        if self.kind == "densenet":
            return F.relu(self.features(images))
        model = self.model
        x = model.maxpool(model.relu(model.bn1(model.conv1(images))))
        return model.layer4(model.layer3(model.layer2(model.layer1(x))))


class XrvNetwork:
    """xrv:WEIGHTS: torchxrayvision's DenseNet-121 (densenet121-res224-*) or ResNet-50 (resnet50-res512-all).

    pretrained=imagenet is torchxrayvision's released file, downloaded by torchxrayvision into its cache
    (~/.torchxrayvision/models_data/) and read by it; offline, copy that file there on every node, or pass its
    state dict as a local weights file. The image size must be the weights' resolution (224 or 512).
    """
    prefix = "xrv:"

    @staticmethod
    def weights_name(cfg: Any) -> str:
        return cfg.backbone[len(XrvNetwork.prefix):]

    @staticmethod
    def _xrv():
        import torchxrayvision   # imported only for xrv: backbones: it takes seconds
        return torchxrayvision

    def resolution(self, cfg: Any) -> int:
        return XRV_WEIGHTS[self.weights_name(cfg)]

    def validate(self, cfg: Any) -> None:
        if self.weights_name(cfg) not in XRV_WEIGHTS:
            raise ConfigError(f"config: backbone={cfg.backbone!r}: not torchxrayvision weights; expected xrv: "
                              f"and one of: {', '.join(XRV_WEIGHTS)}")
        if cfg.pretrained != "none" and cfg.image_size != self.resolution(cfg):
            raise ConfigError(f"config: backbone={cfg.backbone!r} was trained at {self.resolution(cfg)} px: set "
                              f"image_size={self.resolution(cfg)} (image_size={cfg.image_size})")

    def _architecture(self, cfg: Any) -> XrvBackbone:
        xrv = self._xrv()
        if self.weights_name(cfg).startswith("densenet"):
            return XrvBackbone("densenet", xrv.models.DenseNet(weights=None).features, 1024, self.resolution(cfg))
        import torchvision
        resnet = torchvision.models.resnet50(weights=None)
        resnet.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)   # as torchxrayvision does
        resnet.fc = nn.Identity()
        return XrvBackbone("resnet", resnet, 2048, self.resolution(cfg))

    def _released(self, cfg: Any) -> dict[str, torch.Tensor]:
        """torchxrayvision's released network, built (and downloaded, if not cached) by torchxrayvision."""
        from filelock import FileLock
        xrv = self._xrv()
        cache = Path(xrv.utils.get_cache_dir())
        cache.mkdir(parents=True, exist_ok=True)
        with FileLock(str(cache / ".cxr-ablate-download.lock")):   # one download per node, not one per trial
            try:
                network = xrv.models.get_model(self.weights_name(cfg))
            except Exception as err:  # noqa: BLE001 - download or unpickling failure: the same fix
                raise ConfigError(f"{_what(cfg)}: torchxrayvision could not load its weights ({one_line(err)}); "
                                  f"{OFFLINE_FIX}") from None
        return network.state_dict()

    def _load(self, backbone: XrvBackbone, state_dict: dict[str, torch.Tensor], what: str) -> XrvBackbone:
        """Strictly: every backbone key of the file; its classifier and thresholds are dropped."""
        if backbone.kind == "resnet" and not any(key.startswith("model.") for key in state_dict):
            state_dict = {f"model.{key}": value for key, value in state_dict.items()}   # the released -state.pt
        dropped = ("classifier.", "model.fc.", "op_threshs")
        state_dict = {key: value for key, value in state_dict.items() if not key.startswith(dropped)}
        try:
            backbone.load_state_dict(state_dict, strict=True)
        except RuntimeError as err:
            raise ConfigError(f"{what}: weights do not match torchxrayvision's {backbone.kind} ({one_line(err)})"
                              ) from None
        return backbone

    def build(self, cfg: Any) -> nn.Module:
        backbone = self._architecture(cfg)
        if cfg.pretrained == "none":
            return backbone
        if cfg.pretrained == "imagenet":
            self.check_reachable(cfg)
            return self._load(backbone, self._released(cfg), _what(cfg))
        return self._load(backbone, read_weights(cfg.pretrained), f"pretrained={cfg.pretrained!r}")

    def check_reachable(self, cfg: Any) -> None:
        if cfg.pretrained != "imagenet":
            return
        xrv = self._xrv()
        url = xrv.models.model_urls[self.weights_name(cfg)]["weights_url"]
        _url_available(url, Path(xrv.utils.get_cache_dir()) / os.path.basename(url), _what(cfg))


BACKBONE_SOURCES: dict[str, Any] = {
    "hf-hub": HubModel(),
    "local-dir": LocalFolder(),
    "xrv": XrvNetwork(),
    "timm": TimmName(),
}


def backbone_source(name: str):
    """The source a backbone name belongs to: by prefix, a folder path is local-dir, else a timm name."""
    for source in BACKBONE_SOURCES.values():
        if source.prefix and name.startswith(source.prefix):
            return source
    if os.sep in name or name.startswith((".", "~")):
        return BACKBONE_SOURCES["local-dir"]
    return BACKBONE_SOURCES["timm"]


def validate_backbone(cfg: Any) -> None:
    """Offline checks of cfg.backbone with cfg.pretrained and cfg.image_size (TrialConfig validation)."""
    backbone_source(cfg.backbone).validate(cfg)


def create_backbone(cfg: Any) -> nn.Module:
    """The backbone without classifier, grayscale input, sized for cfg.image_size, with cfg.pretrained weights."""
    return backbone_source(cfg.backbone).build(cfg)


def check_pretrained(cfg: Any) -> None:
    """Fail now, with the fix, if cfg's weights cannot be had; else load them once.

    Run before any trial starts (the CLIs, the sweep drivers), so that unreachable or unfit weights do not fail
    every trial after its retries. Reachability is checked first, without downloading or retrying, so an
    air-gapped machine gets its answer in seconds; then the backbone is built, which downloads the weights into
    this machine's cache on a connected one and checks them strictly.
    """
    source = backbone_source(cfg.backbone)
    if cfg.pretrained == "none" and not isinstance(source, HubModel):
        return
    source.check_reachable(cfg)
    create_backbone(cfg)


def warnings_for(cfg: Any) -> list[str]:
    """Lines a user should read before trusting results of this backbone on NIH ChestX-ray14."""
    source = backbone_source(cfg.backbone)
    if isinstance(source, XrvNetwork) and cfg.pretrained != "none" and source.weights_name(cfg) in XRV_SAW_NIH:
        return [f"warning: {cfg.backbone} was trained on NIH ChestX-ray14 images (torchxrayvision's own split, "
                f"not NIH's): its validation and test AUCs on NIH are optimistic; densenet121-res224-chex, "
                f"-mimic_ch, -mimic_nb and -pc never saw NIH images"]
    return []
