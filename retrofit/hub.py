"""Retrofit saves on the Hugging Face Hub, shared as timm shares weights.

:func:`push_to_hub` uploads a folder save to a model repository: ``model.safetensors``,
``recipe.json``, the model file if the recipe names one, and a model card (``README.md``)
that names the base model, the rules, the parameter counts and the identity check.
``retrofit.load("hf-hub:ORG/NAME")`` fetches those files through ``huggingface_hub`` (its
cache, ``HF_HUB_OFFLINE``, your login; :func:`download`) and then reads the snapshot folder
as any local folder save, through the same loader: nothing the recipe names runs without
``trust_code``, and a model file is found beside ``recipe.json`` in the same commit and
checked against the sha256 the save recorded.

``hf-hub:`` means two things in retrofit, both taken from timm, and never the same thing:

* a **base model**: ``retrofit.create_model("hf-hub:timm/resnet50.a1_in1k")`` and
  ``retrofit hf-hub:timm/resnet50.a1_in1k --attn se`` build timm's model from its
  configuration on the Hub (timm's own prefix);
* a **retrofit save**: ``retrofit.load("hf-hub:ORG/NAME")`` (and ``retrofit gates`` /
  ``retrofit diff``) read a repository written by :func:`push_to_hub`.

A repository without ``recipe.json`` is not a retrofit save; loading one says so and points
to the first meaning.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from torch import nn

from .errors import ModelLoadError, OptionError, SaveError, first_line
from .frameworks import framework_of_spec
from .recipe import TRUST_HINT, Recipe, get_recipe, is_file_spec
from .saving import RECIPE_FILE, WEIGHTS_FILE, read_save, save

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo

    from .report import Report

__all__ = ["HUB_PREFIX", "CARD_FILE", "is_hub_save", "parse_hub_name", "download", "save_for_hub", "model_card",
           "push_to_hub"]

HUB_PREFIX = "hf-hub:"
CARD_FILE = "README.md"  # the model card, as the Hub shows it
_PYPI = "https://pypi.org/project/torch-retrofit/"
# A Hub repository id (huggingface_hub's rules: letters, digits, "-", "_", "."), with an
# optional "@revision" (a branch, tag or commit), as timm writes "hf-hub:ORG/NAME@REV".
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_save(path: object) -> bool:
    """Whether :func:`retrofit.load` reads ``path`` from the Hub: a string starting with
    ``hf-hub:`` (a ``Path`` is always a local file or folder)."""
    return isinstance(path, str) and path.startswith(HUB_PREFIX)


def parse_hub_name(name: str) -> tuple[str, str | None]:
    """``"hf-hub:ORG/NAME@REVISION"`` (prefix and revision optional) as ``(repo_id, revision)``.

    Raises:
        OptionError: not a repository id.
    """
    repo_id, at, revision = name.removeprefix(HUB_PREFIX).partition("@")
    if not _REPO_ID.fullmatch(repo_id) or ".." in repo_id or (at and not revision):
        raise OptionError(f"{name!r} does not name a Hugging Face Hub repository; expected hf-hub:ORG/NAME "
                          "(or hf-hub:ORG/NAME@REVISION for a branch, tag or commit)")
    return repo_id, revision or None


# --------------------------------------------------------------------------- downloading


def _missing(name: str, filename: str) -> ModelLoadError:
    """The repository (as the Hub or the cache knows it) has no ``filename``."""
    if filename == RECIPE_FILE:
        base = name.partition("@")[0]
        return ModelLoadError(
            f"{name} is not a retrofit save: the repository has no {RECIPE_FILE}. A timm model on the Hub is a base "
            f"model: retrofit.create_model({base!r}), or `retrofit {base} --attn se` on the command line"
        )
    return ModelLoadError(f"{name}: the repository has no {filename}, which its {RECIPE_FILE} needs; the save is "
                          "incomplete (push it again with retrofit.push_to_hub)")


def _fetch(name: str, repo_id: str, filename: str, revision: str | None, token: str | bool | None) -> Path:
    """One file of the repository, through the Hugging Face cache; errors say what to do."""
    from huggingface_hub import _CACHED_NO_EXIST, constants, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.utils import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from . import DISTRIBUTION, __version__

    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, token=token,
                                    library_name=DISTRIBUTION, library_version=__version__))
    except LocalEntryNotFoundError as e:  # offline, or the Hub unreachable, and not in the cache
        if try_to_load_from_cache(repo_id, filename, revision=revision) is _CACHED_NO_EXIST:
            raise _missing(name, filename) from e  # the cache recorded that the Hub has no such file
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        raise ModelLoadError(
            f"{name}: {filename} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the Hub cannot be "
            f"reached{offline}; load it once with the network, or point HF_HUB_CACHE at a cache that holds it"
        ) from e
    except RepositoryNotFoundError as e:  # also gated repositories
        raise ModelLoadError(f"{name}: no model repository {repo_id!r} on the Hugging Face Hub that you can read "
                             "(check the name; a private or gated one needs `hf auth login` or a token)") from e
    except RevisionNotFoundError as e:
        raise ModelLoadError(f"{name}: the repository {repo_id!r} has no revision {revision!r} (a branch, tag or "
                             "commit)") from e
    except EntryNotFoundError as e:
        raise _missing(name, filename) from e
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise ModelLoadError(f"{name}: cannot download {filename} from the Hugging Face Hub "
                             f"({type(e).__name__}: {first_line(e)})") from e


def download(name: str, *, token: str | bool | None = None) -> Path:
    """Fetch a retrofit save from the Hub into the Hugging Face cache and return its folder
    (the cache's snapshot of one commit): ``recipe.json`` first, then the weights and any
    model file the recipe names, all at the commit ``recipe.json`` came from.

    Nothing is imported or run; :func:`retrofit.load` calls this and then reads the folder
    under the trust rules of any local save.

    Args:
        name: ``"hf-hub:ORG/NAME"`` or ``"hf-hub:ORG/NAME@REVISION"``.
        token: a Hub token (default: your login, ``HF_TOKEN``).

    Raises:
        OptionError: ``name`` is not a repository id.
        ModelLoadError: the repository, revision or a file is missing, it is not a retrofit
            save, a model file lies outside it, or offline and not in the cache.
    """
    repo_id, revision = parse_hub_name(name)
    folder = _fetch(name, repo_id, RECIPE_FILE, revision, token).parent
    # The snapshot folder is named by its commit: fetch the rest from the same one, even if
    # the branch moves meanwhile.
    commit = folder.name if re.fullmatch(r"[0-9a-f]{40}", folder.name) else revision
    _fetch(name, repo_id, WEIGHTS_FILE, commit, token)
    for file in read_save(folder).recipe.model_files():
        rel = PurePosixPath(file)
        if rel.is_absolute() or ".." in rel.parts:
            raise ModelLoadError(f"{name}: its recipe names the model file {file!r}, outside the repository; a save "
                                 "on the Hub carries its model file beside recipe.json. Not fetching it")
        _fetch(name, repo_id, rel.as_posix(), commit, token)
    return folder


# --------------------------------------------------------------------------- writing


def _innermost(recipe: Recipe) -> Recipe:
    while recipe.base is not None:
        recipe = recipe.base
    return recipe


def _describe_base(recipe: Recipe) -> tuple[str, str | None]:
    """How the card names the base model, and its Hub repository when it has one."""
    spec = _innermost(recipe).model or "?"
    if spec.startswith(HUB_PREFIX):
        return f"timm model `{spec}` (its configuration from the Hugging Face Hub)", spec.removeprefix(HUB_PREFIX)
    if spec.startswith("torchvision:"):
        return f"torchvision model `{spec.removeprefix('torchvision:')}`", None
    if is_file_spec(spec):
        file, _, factory = spec.rpartition(":")
        return f"`{factory}()` of the model file `{file}`, included in this repository", None
    framework = framework_of_spec(spec)
    if framework is not None:
        return framework[0].title(framework[1], _innermost(recipe).model_kwargs), None
    return f"timm model `{spec.removeprefix('timm:')}`", None


def _identity_check(model: nn.Module, recipe: Recipe, folder: Path) -> tuple[Report | None, str]:
    """The report whose identity check the card shows, and where that check comes from:
    the model's own (run when ``retrofit()`` inserted its modules), else a fresh build of
    the recipe, checked now (a loaded model carries no check)."""
    from .api import get_report

    report = get_report(model)
    if report is not None and report.max_abs_diff is not None:
        return report, "when retrofit() inserted the modules, on the base model's weights as they were then"
    if recipe.rules is None:
        return report, ""
    rebuilt = recipe.resolved(folder).build(verify=True)
    return (get_report(rebuilt), "before the upload, on a fresh build of the recipe (the model was loaded from a "
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

    from . import DISTRIBUTION, __version__

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
    kwargs = json.dumps(dict(_innermost(recipe).model_kwargs))
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
    sha = _innermost(recipe).model_sha256
    files += [f"- `{file}`: the model file (sha256 `{sha}`)" for file in recipe.model_files()]
    lines += ["## Files", "", *files, ""]
    return "\n".join(lines)


def _real_file(path: Path) -> Path:
    return path.resolve() if path.exists() else path.absolute()


def _rules_names(recipe: Recipe) -> str:
    names = []
    r: Recipe | None = recipe
    while r is not None:
        if r.rules is not None:
            names.append(r.rules_name)
        r = r.base
    return ", then ".join(reversed(names)) or "none (the base model alone)"


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
        model_spec, model_kwargs: as for :func:`retrofit.save`.
        license: the weights' license id for the card (see :func:`model_card`).
        force: write into an existing folder, replacing these files.

    Returns:
        The folder.

    Raises:
        SaveError, OptionError: as :func:`retrofit.save`.
    """
    folder = Path(folder)
    repo_id, _ = parse_hub_name(repo_id)
    if folder.exists() and not force:
        raise SaveError(f"{str(folder)!r} exists; not overwriting it (pass force=True to replace its files)")
    recipe = get_recipe(model)
    if recipe is not None and (model_spec is not None or model_kwargs is not None):
        recipe = recipe.with_model(model_spec, model_kwargs)
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        spec = _innermost(recipe).model if recipe is not None else None
        if spec is not None and is_file_spec(spec):
            # The repository carries the model file beside recipe.json (the recipe then names
            # it by its file name); a file elsewhere would not travel with the save.
            file, _, factory = spec.rpartition(":")
            source = Path(file)
            if not source.is_file():
                raise SaveError(f"model file {file!r} not found; a save records the file's hash, so the file must "
                                "exist when the model is saved")
            if _real_file(source) != _real_file(folder / source.name):
                shutil.copyfile(source, folder / source.name)
            model_spec = f"{folder / source.name}:{factory}"
        save(model, folder, model_spec=model_spec, model_kwargs=model_kwargs, force=True)
        card = model_card(model, folder, repo_id, license=license)
        (folder / CARD_FILE).write_text(card, encoding="utf-8")
    except BaseException:
        if created:
            shutil.rmtree(folder, ignore_errors=True)
        raise
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
        model_spec, model_kwargs: as for :func:`retrofit.save`.
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

    from . import __version__

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
