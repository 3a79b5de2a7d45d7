"""Retrofit saves on the Hugging Face Hub, shared as timm shares weights.

:func:`push_to_hub` uploads a folder save to a model repository: ``model.safetensors``,
``recipe.json``, the model file if the recipe names one, and a model card (``README.md``)
that names the base model, the rules, the parameter counts and the identity check.
``retrofit.load("hf-hub:ORG/NAME")`` reads it back (:mod:`retrofit.hub`).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from .atomic import new_folder
from .build import build_model, save
from .errors import OptionError, SaveError, first_line
from .frameworks import framework_of_spec
from .hub import HUB_PREFIX, parse_hub_name
from .recipe import TRUST_HINT, Recipe
from .report import Report, report_of
from .saving import RECIPE_FILE, WEIGHTS_FILE, read_save
from .specs import is_file_spec, split_file_spec
from .version import DISTRIBUTION, __version__

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo

__all__ = ["CARD_FILE", "save_for_hub", "model_card", "push_to_hub"]

CARD_FILE = "README.md"  # the model card, as the Hub shows it
_PYPI = "https://pypi.org/project/torch-retrofit/"


def _describe_base(recipe: Recipe) -> tuple[str, str | None]:
    """How the card names the base model, and its Hub repository when it has one."""
    spec = recipe.innermost().model or "?"
    if spec.startswith(HUB_PREFIX):
        return f"timm model `{spec}` (its configuration from the Hugging Face Hub)", spec.removeprefix(HUB_PREFIX)
    if spec.startswith("torchvision:"):
        return f"torchvision model `{spec.removeprefix('torchvision:')}`", None
    if is_file_spec(spec):
        file, factory = split_file_spec(spec)
        return f"`{factory}()` of the model file `{file}`, included in this repository", None
    framework = framework_of_spec(spec)
    if framework is not None:
        return framework[0].title(framework[1], recipe.innermost().model_kwargs), None
    return f"timm model `{spec.removeprefix('timm:')}`", None


def _identity_check(model: nn.Module, recipe: Recipe, folder: Path) -> tuple[Report | None, str]:
    """The report whose identity check the card shows, and where that check comes from:
    the model's own (run when ``retrofit()`` inserted its modules), else a fresh build of
    the recipe, checked now (a loaded model carries no check)."""
    report = report_of(model)
    if report is not None and report.max_abs_diff is not None:
        return report, "when retrofit() inserted the modules, on the base model's weights as they were then"
    if recipe.rules is None:
        return report, ""  # a base model alone (retrofit.create_model): no attention, no check
    rebuilt = build_model(recipe.resolved(folder), verify=True, trust_code=True)
    return (report_of(rebuilt), "before the upload, on a fresh build of the recipe (the model was loaded from a "
            "save, which does not keep the check retrofit() ran)")


def model_card(model: nn.Module, folder: str | Path, repo_id: str, *, license: str | None = None) -> str:
    """The model card (``README.md``) of the save in ``folder``: the base model, the rules,
    parameter counts, the identity check, how to load it and what loading runs.

    Args:
        model: the model saved in ``folder``.
        folder: a folder save of ``model`` (what :func:`save_for_hub` writes).
        repo_id: the repository it goes to (``ORG/NAME``).
        license: the weights' license for the card's metadata (a Hub license id such as
            ``"apache-2.0"``); none by default, since it depends on the base model's weights.
    """
    from huggingface_hub import ModelCardData


    folder = Path(folder)
    saved = read_save(folder)
    recipe = saved.recipe
    report, check_source = _identity_check(model, recipe, folder)
    base, base_repo = _describe_base(recipe)
    attns = sorted({row.attn for row in report.rows}) if report is not None else []
    data = ModelCardData(library_name=DISTRIBUTION, license=license, base_model=base_repo,
                         tags=["retrofit", "attention", *attns])
    foreign = recipe.foreign_code()
    trust = ", trust_code=True" if foreign else ""
    lines = [
        "---", data.to_yaml(), "---", "",
        f"# {repo_id}", "",
        f"The {base}, with attention modules ({', '.join(attns) or 'none'}) inserted by "
        f"[retrofit]({_PYPI}) ({DISTRIBUTION} {__version__}). Each inserted module starts as an exact identity: "
        "right after insertion the model computes exactly what the base model computes (checked below); "
        "training changes that.", "",
        "## Use", "",
        "```bash", f"pip install {DISTRIBUTION}", "```", "",
        "```python", "import retrofit", "", f'model = retrofit.load("{HUB_PREFIX}{repo_id}"{trust})', "```", "",
    ]
    if foreign:
        lines += [f"Building this model runs code from this repository: {'; '.join(foreign)}. `retrofit.load` "
                  f"refuses it unless you allow it ({TRUST_HINT}); read the file first.", ""]
    else:
        lines += ["Loading runs no code from this repository: the base model is built by its registry name and "
                  "the weights are read with safetensors.", ""]
    kwargs = json.dumps(dict(recipe.innermost().model_kwargs))
    built = (f"built with the arguments `{kwargs}`" if len(kwargs) <= 400 else
             f"built from the configuration `{RECIPE_FILE}` records (`model_kwargs`)")
    lines += [
        "## Base model", "",
        f"The {base}, {built}.", "",
        "## Rules", "",
        f"Rule set: {_rules_names(recipe)}. Its document, as `{RECIPE_FILE}` records it (`rules`; the file also "
        "holds every other option retrofit() ran with):", "",
        "```json", json.dumps(recipe.rules, indent=2), "```", "",
    ]
    if report is not None:
        lines += [
            "## Parameters and the identity check", "",
            "What `retrofit` printed for this model (parameters before and after, sites, and the largest output "
            f"difference against the base model at insertion), checked {check_source}:", "",
            "```", report.summary(), "```", "",
        ]
        if report.stages:
            lines += ["```", report.stage_table(), "```", ""]
    files = [f"- `{WEIGHTS_FILE}`: the weights (safetensors)",
             f"- `{RECIPE_FILE}`: how to build the model again (base model, rules, options), read by `retrofit.load`"]
    sha = recipe.innermost().model_sha256
    files += [f"- `{file}`: the model file (sha256 `{sha}`)" for file in recipe.model_files()]
    lines += ["## Files", "", *files, ""]
    return "\n".join(lines)


def _rules_names(recipe: Recipe) -> str:
    names = [r.rules_name for r in recipe.chain() if r.rules is not None]
    return ", then ".join(names) or "none (the base model alone)"


def save_for_hub(
    model: nn.Module,
    folder: str | Path,
    repo_id: str,
    *,
    model_spec: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    license: str | None = None,
    force: bool = False,
) -> Path:
    """Write the folder :func:`push_to_hub` uploads: a folder save (``model.safetensors``,
    ``recipe.json``), the model file if the recipe names one (copied in, recorded by its
    name and sha256), and the model card ``README.md``.

    Args:
        model: a model from :func:`retrofit.retrofit` or :func:`retrofit.load`.
        folder: where to write (it must not exist, unless ``force``).
        repo_id: the repository it is meant for (``ORG/NAME``), named in the card.
        model_spec: as for :func:`retrofit.save`.
        model_kwargs: as for :func:`retrofit.save`.
        license: the weights' license id for the card (see :func:`model_card`).
        force: replace an existing folder's save, model file and card; its other files
            are kept.

    The folder is written as a new folder beside ``folder`` and put in place with one
    rename (:func:`retrofit.atomic.new_folder`): a failed or interrupted write leaves an
    existing folder as it was, and without ``force`` two writers cannot both get it.

    Returns:
        The folder.

    Raises:
        SaveError, OptionError: as :func:`retrofit.save`.
    """
    folder = Path(folder)
    repo_id, _ = parse_hub_name(repo_id)
    if os.path.lexists(folder) and not force:
        raise SaveError(f"{str(folder)!r} exists; not overwriting it (pass force=True to replace its files)")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SaveError(f"cannot create folder {str(folder.parent)!r}: {e.strerror or first_line(e)}") from e
    with new_folder(folder, replace=force) as stage:  # becomes `folder` when complete
        # The save carries the model file into the folder (Recipe.located): the repository
        # holds it beside recipe.json, which names it by its file name.
        save(model, stage, model_spec=model_spec, model_kwargs=model_kwargs, force=True)
        card = model_card(model, stage, repo_id, license=license)
        (stage / CARD_FILE).write_text(card, encoding="utf-8")
    return folder


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    model_spec: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    license: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
) -> CommitInfo:
    """Upload a retrofitted model to a Hugging Face Hub model repository, as a save that
    ``retrofit.load("hf-hub:ORG/NAME")`` reads.

    The files (:func:`save_for_hub`) are written to a temporary folder first, so a model
    that cannot be saved fails before anything is sent; then the repository is created if
    needed and the files go up in one commit.

    Args:
        model: a model from :func:`retrofit.retrofit` or :func:`retrofit.load`.
        repo_id: ``ORG/NAME`` (``hf-hub:ORG/NAME`` works too).
        model_spec: as for :func:`retrofit.save`.
        model_kwargs: as for :func:`retrofit.save`.
        license: the weights' license id for the card's metadata.
        private: create the repository private (a new repository only).
        token: a Hub token with write access (default: your login, ``HF_TOKEN``).
        revision: the branch to commit to (default: the main branch).
        create_pr: open a pull request instead of committing.
        commit_message: default "Add retrofit save".

    Returns:
        ``huggingface_hub``'s ``CommitInfo`` (its ``commit_url``, ``oid``, ...).

    Raises:
        SaveError: the model cannot be saved, or the Hub refused the upload (the message
            says why: no login, no write access, ...).
        OptionError: not a repository id, or the model did not come from retrofit.

    Example:
        >>> retrofit.push_to_hub(gm, "my-org/resnet50-se")
        >>> gm = retrofit.load("hf-hub:my-org/resnet50-se")
    """
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.utils import HfHubHTTPError

    repo_id, at = parse_hub_name(repo_id)
    if at is not None:
        raise OptionError(f"push_to_hub takes a repository id without a revision, not {at!r} in it; pass "
                          f"revision={at!r} to commit to that branch")
    with tempfile.TemporaryDirectory(prefix="retrofit-hub-") as tmp:
        folder = save_for_hub(model, Path(tmp) / "save", repo_id, model_spec=model_spec, model_kwargs=model_kwargs,
                              license=license)
        operations = [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p))
                      for p in sorted(folder.rglob("*")) if p.is_file()]
        api = HfApi(token=token)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            return api.create_commit(repo_id, operations, repo_type="model", revision=revision, create_pr=create_pr,
                                     commit_message=commit_message or "Add retrofit save",
                                     commit_description=f"Written by torch-retrofit {__version__}.")
        except (HfHubHTTPError, OSError, ValueError) as e:
            raise SaveError(f"cannot upload to the Hugging Face Hub repository {repo_id!r} "
                            f"({type(e).__name__}: {first_line(e)}); log in with `hf auth login` or pass token=... "
                            "with write access") from e
