"""``DerivativesDataSink``: the one nipype node that puts a file into the output dataset.

It copies a work-directory file to its BIDS-derivatives name atomically (gzipping the work
folder's uncompressed images, :mod:`bids_uad.interfaces.workfiles`) and writes the JSON
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
    isdefined,
    traits,
)

from bids_uad.bids import outputs
from bids_uad.bids.derivatives import DerivativesWriter, atomic_path, write_json
from bids_uad.interfaces.workfiles import WORK_NIFTI, compress_nifti


class _DerivativesDataSinkInputSpec(BaseInterfaceInputSpec):
    in_file = traits.Str(mandatory=True, desc="file to store")
    skip_empty = traits.Bool(False, usedefault=True,
                             desc="store nothing when in_file is '' (an optional output that was not made)")
    output_dir = traits.Str(mandatory=True, desc="derivatives root (OUTPUT_DIR)")
    bids_dir = traits.Str(desc="input dataset, to refuse writing inside it and to cite sources")
    output = traits.Str(desc="key of the declared outputs table (bids_uad.bids.outputs.OUTPUTS): "
                             "own entities, suffix, extension and folder come from there")
    params = traits.Dict(desc="parameters of the table entry, e.g. model, template")
    source_file = traits.Str(desc="the input this derivative is made from: its entities (sub, ses, "
                                  "acq, dir, run, ...) are inherited, as in niworkflows")
    entities = traits.Dict(desc="explicit entities (without output/source_file: the whole name)")
    suffix = traits.Str(desc="BIDS suffix, e.g. dwi, mask, dwimap (default: the table's)")
    extension = traits.Str(desc="extension; default: the table's, else that of in_file")
    datatype = traits.Str(desc="datatype folder: anat, dwi, fmap, figures (default: the table's)")
    meta = traits.Dict(desc="JSON sidecar fields")
    source_files = traits.List(traits.Str, desc="input files this derivative comes from "
                                                "(default: source_file)")
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


def _stored_extension(path: str) -> str:
    """The extension a derivative gets from its work file when the table names none: images
    are stored compressed, whatever the work folder keeps."""
    ext = _extension_of(path)
    return ".nii.gz" if ext == WORK_NIFTI else ext


def _given(value) -> bool:
    return isdefined(value) and value not in ("", None)


class DerivativesDataSink(SimpleInterface):
    """Store ``in_file`` as a named BIDS derivative with a sidecar (atomic).

    The name: the table entry ``output`` (its own entities, with ``params``) over the entities
    inherited from ``source_file`` (every raw entity: acq, dir, run, ...).  Without ``output``:
    ``source_file``'s entities with ``entities`` merged over them, or ``entities`` alone (the
    longitudinal stage, which builds them with :func:`bids_uad.bids.outputs.entities_for`).
    """

    input_spec = _DerivativesDataSinkInputSpec
    output_spec = _DerivativesDataSinkOutputSpec

    def _name(self) -> tuple[dict, str, str | None, str | None]:
        """(entities, suffix, extension or None, datatype or None) of the stored file."""
        inputs = self.inputs
        params = dict(inputs.params) if _given(inputs.params) else {}
        source = inputs.source_file if _given(inputs.source_file) else None
        explicit = dict(inputs.entities) if _given(inputs.entities) else {}
        suffix = extension = datatype = None
        if _given(inputs.output):
            spec = outputs.OUTPUTS[inputs.output]
            entities = outputs.entities_for(inputs.output, source if source is not None else explicit, **params)
            suffix, extension, datatype = outputs.suffix_of(inputs.output, **params), spec.extension, spec.datatype
        elif source is not None:
            entities = {**outputs.source_entities(source), **explicit}
        else:
            entities = explicit
        if _given(inputs.suffix):
            suffix = inputs.suffix
        if _given(inputs.extension):
            extension = inputs.extension
        if _given(inputs.datatype):
            datatype = inputs.datatype
        if not suffix:
            raise ValueError("DerivativesDataSink needs an output key or a suffix")
        return entities, suffix, extension, datatype or None

    def _run_interface(self, runtime):
        if not self.inputs.in_file and self.inputs.skip_empty:
            self._results["out_file"] = ""
            return runtime
        if not Path(self.inputs.in_file).is_file():
            raise FileNotFoundError(f"DerivativesDataSink: no such file {self.inputs.in_file!r}")
        writer = DerivativesWriter(self.inputs.output_dir, self.inputs.bids_dir or None)
        entities, suffix, extension, datatype = self._name()
        extension = extension or _stored_extension(self.inputs.in_file)
        target = writer.path(entities, suffix, extension, datatype)
        with atomic_path(target) as tmp:
            if extension == ".nii.gz" and _extension_of(self.inputs.in_file) == WORK_NIFTI:
                compress_nifti(self.inputs.in_file, tmp)
            else:
                shutil.copyfile(self.inputs.in_file, tmp)
        self._results["out_file"] = str(target)
        if self.inputs.write_sidecar and extension in (".nii.gz", ".nii", ".tsv", ".h5", ".txt", ".mat"):
            sources = list(self.inputs.source_files) if _given(self.inputs.source_files) else []
            if not sources and _given(self.inputs.source_file):
                sources = [self.inputs.source_file]
            meta = writer.sidecar_base(sources or None)
            meta.update(self.inputs.meta if _given(self.inputs.meta) else {})
            sidecar = target.with_name(target.name[: -len(extension)] + ".json")
            write_json(sidecar, meta)
            self._results["out_meta"] = str(sidecar)
        return runtime
