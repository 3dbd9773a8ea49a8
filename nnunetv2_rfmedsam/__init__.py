"""RFMedSAM 2 as an nnU-Net v2 plugin."""
__version__ = "0.1.0"

# the plugin's trainers reach nnUNetv2_train through nnUNet_extTrainer, which nnU-Net has since 2.8.0 (2.7 lacks it)
MINIMUM_NNUNET = (2, 8)


def check_nnunet_version(version: str) -> None:
    """Refuse an nnU-Net older than 2.8 with one line naming the installed version."""
    numbers = []
    for part in version.split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit())
        numbers.append(int(digits) if digits else 0)
    if tuple(numbers) < MINIMUM_NNUNET:
        raise ImportError(f"nnunetv2_rfmedsam needs nnunetv2 >= {'.'.join(map(str, MINIMUM_NNUNET))} (for its "
                          f"nnUNet_extTrainer lookup); nnunetv2 {version} is installed: pip install 'nnunetv2>=2.8,<2.9'")


def _installed_nnunet_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("nnunetv2")
    except PackageNotFoundError:
        return None  # a source checkout on sys.path: nothing to read the version from


_version = _installed_nnunet_version()
if _version is not None:
    check_nnunet_version(_version)
