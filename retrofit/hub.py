"""Retrofit saves on the Hugging Face Hub, fetched: what ``"hf-hub:ORG/NAME"`` names, and
the files of such a save brought into the Hugging Face cache.

``retrofit.load("hf-hub:ORG/NAME")`` fetches a save's files through ``huggingface_hub``
(its cache, ``HF_HUB_OFFLINE``, your login; :func:`download`) and then reads the snapshot
folder as any local folder save, through the same loader: nothing the recipe names runs
without ``trust_code``, and a model file is found beside ``recipe.json`` in the same commit
and checked against the sha256 the save recorded. Writing and uploading saves is
:mod:`retrofit.publish`.

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

import re
from pathlib import Path, PurePosixPath

from .download import hf_endpoint, hf_offline_requested, hf_quiet, unreachable
from .errors import ModelLoadError, OptionError, first_line
from .saving import RECIPE_FILE, WEIGHTS_FILE, read_save

__all__ = ["HUB_PREFIX", "is_hub_save", "parse_hub_name", "download"]

HUB_PREFIX = "hf-hub:"
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


def _fetch(name: str, repo_id: str, filename: str, revision: str | None, token: str | bool | None,
           offline: str | None) -> Path:
    """One file of the repository, through the Hugging Face cache; errors say what to do.
    ``offline``: why the Hub cannot be reached (the cache alone is asked), or None."""
    from huggingface_hub import _CACHED_NO_EXIST, constants, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.utils import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from .version import DISTRIBUTION, __version__

    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, token=token, local_files_only=bool(offline),
                                    library_name=DISTRIBUTION, library_version=__version__))
    except LocalEntryNotFoundError as e:  # offline, or the Hub unreachable, and not in the cache
        if try_to_load_from_cache(repo_id, filename, revision=revision) is _CACHED_NO_EXIST:
            raise _missing(name, filename) from e  # the cache recorded that the Hub has no such file
        if offline:
            raise ModelLoadError(
                f"{name}: {filename} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and there is no "
                f"network ({offline}); load it once with the network, or point HF_HUB_CACHE at a cache that holds it"
            ) from e
        why = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        raise ModelLoadError(
            f"{name}: {filename} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the Hub cannot be "
            f"reached{why}; load it once with the network, or point HF_HUB_CACHE at a cache that holds it"
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

    Without a network it answers at once, as ``--pretrained`` does (:mod:`retrofit.download`):
    unless ``HF_HUB_OFFLINE`` is set, one TCP connection to the Hub is tried first (at most
    :data:`~retrofit.download.PROBE_TIMEOUT` seconds); when it fails, only the cache is asked
    (``local_files_only``: the snapshot if it is there, else one error), with none of
    huggingface_hub's retries. Its retry warnings are not printed in any case.

    Args:
        name: ``"hf-hub:ORG/NAME"`` or ``"hf-hub:ORG/NAME@REVISION"``.
        token: a Hub token (default: your login, ``HF_TOKEN``).

    Raises:
        OptionError: ``name`` is not a repository id.
        ModelLoadError: the repository, revision or a file is missing, it is not a retrofit
            save, a model file lies outside it, or offline and not in the cache.
    """
    repo_id, revision = parse_hub_name(name)
    offline = None if hf_offline_requested() else unreachable(hf_endpoint())
    with hf_quiet():
        folder = _fetch(name, repo_id, RECIPE_FILE, revision, token, offline).parent
        # The snapshot folder is named by its commit: fetch the rest from the same one, even
        # if the branch moves meanwhile.
        commit = folder.name if re.fullmatch(r"[0-9a-f]{40}", folder.name) else revision
        _fetch(name, repo_id, WEIGHTS_FILE, commit, token, offline)
        for file in read_save(folder).recipe.model_files():
            rel = PurePosixPath(file)
            if rel.is_absolute() or ".." in rel.parts:
                raise ModelLoadError(f"{name}: its recipe names the model file {file!r}, outside the repository; a "
                                     "save on the Hub carries its model file beside recipe.json. Not fetching it")
            _fetch(name, repo_id, rel.as_posix(), commit, token, offline)
    return folder


# --------------------------------------------------------------------------- writing
