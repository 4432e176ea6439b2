"""``DerivativesDataSink``: the one nipype node that puts a file into the output dataset.

It copies a work-directory file to its BIDS-derivatives name atomically and writes the JSON
sidecar.  Workflows connect their results to one of these per output; nothing else writes
into ``OUTPUT_DIR``.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)

from bids_uad.bids.derivatives import DerivativesWriter, atomic_path, write_json


class _DerivativesDataSinkInputSpec(BaseInterfaceInputSpec):
    in_file = traits.Str(mandatory=True, desc="file to store")
    skip_empty = traits.Bool(False, usedefault=True,
                             desc="store nothing when in_file is '' (an optional output that was not made)")
    output_dir = traits.Str(mandatory=True, desc="derivatives root (OUTPUT_DIR)")
    bids_dir = traits.Str(desc="input dataset, to refuse writing inside it and to cite sources")
    entities = traits.Dict(mandatory=True, desc="BIDS entities (sub, ses, space, desc, ...)")
    extra_entities = traits.Dict(desc="entities merged over ``entities`` (e.g. space, stat)")
    suffix = traits.Str(mandatory=True, desc="BIDS suffix, e.g. dwi, mask, dwimap")
    extension = traits.Str(desc="extension; default: that of in_file")
    datatype = traits.Str(desc="datatype folder: anat, dwi, fmap, figures")
    meta = traits.Dict(desc="JSON sidecar fields")
    source_files = traits.List(traits.Str, desc="input files this derivative comes from")
    write_sidecar = traits.Bool(True, usedefault=True, desc="write a JSON sidecar")


class _DerivativesDataSinkOutputSpec(TraitedSpec):
    out_file = traits.Str(desc="the stored derivative ('' when skipped)")
    out_meta = File(desc="its JSON sidecar")


def _extension_of(path: str) -> str:
    name = Path(path).name
    for ext in (".nii.gz", ".tsv.gz"):
        if name.endswith(ext):
            return ext
    return Path(path).suffix


class DerivativesDataSink(SimpleInterface):
    """Store ``in_file`` as a named BIDS derivative with a sidecar (atomic)."""

    input_spec = _DerivativesDataSinkInputSpec
    output_spec = _DerivativesDataSinkOutputSpec

    def _run_interface(self, runtime):
        if not self.inputs.in_file and self.inputs.skip_empty:
            self._results["out_file"] = ""
            return runtime
        if not Path(self.inputs.in_file).is_file():
            raise FileNotFoundError(f"DerivativesDataSink: no such file {self.inputs.in_file!r}")
        writer = DerivativesWriter(self.inputs.output_dir, self.inputs.bids_dir or None)
        extension = self.inputs.extension or _extension_of(self.inputs.in_file)
        datatype = self.inputs.datatype or None
        entities = {**self.inputs.entities, **(self.inputs.extra_entities or {})}
        target = writer.path(entities, self.inputs.suffix, extension, datatype)
        with atomic_path(target) as tmp:
            shutil.copyfile(self.inputs.in_file, tmp)
        self._results["out_file"] = str(target)
        if self.inputs.write_sidecar and extension in (".nii.gz", ".nii", ".tsv", ".h5", ".txt", ".mat"):
            meta = writer.sidecar_base(list(self.inputs.source_files) or None)
            meta.update(self.inputs.meta or {})
            sidecar = target.with_name(target.name[: -len(extension)] + ".json")
            write_json(sidecar, meta)
            self._results["out_meta"] = str(sidecar)
        return runtime
