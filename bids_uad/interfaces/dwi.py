"""Thin nipype interfaces for diffusion preprocessing: files in, one algorithm, files out.

The numerics live in :mod:`bids_uad.algorithms`; here we read/validate inputs (phase-encoding
metadata, grids, gradient tables), call the algorithm and write NIfTI/TSV/text outputs into the
node's working directory.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from bids_uad.bids.gradients import B0_THRESHOLD
from bids_uad.bids.layout import sidecar_of
from bids_uad.bids.phase_encoding import SOURCE_KEY as PE_SOURCE_KEY
from bids_uad.bids.validate import phase_encoding, readout_time_or_nominal, total_readout_time
from bids_uad.errors import InputValidationError
from bids_uad.interfaces.derivatives import DerivativesDataSink
from bids_uad.interfaces.workfiles import work_nifti

LOGGER = logging.getLogger("bids_uad.dwi")

SDC_SKIPPED = "None (no reverse phase-encoding image)"
MOTION_COLUMNS = ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z", "framewise_displacement")
MOTION_COLUMN_DESCRIPTIONS: dict[str, Any] = {
    "trans_x": {"Description": "Translation along the first voxel axis (x) of the reference", "Units": "mm"},
    "trans_y": {"Description": "Translation along the second voxel axis (y)", "Units": "mm"},
    "trans_z": {"Description": "Translation along the third voxel axis (z)", "Units": "mm"},
    "rot_x": {"Description": "Rotation about x (R = Rz Ry Rx, about the grid centre)", "Units": "rad"},
    "rot_y": {"Description": "Rotation about y", "Units": "rad"},
    "rot_z": {"Description": "Rotation about z", "Units": "rad"},
    "framewise_displacement": {
        "Description": "Framewise displacement (Power et al. 2012; rotations on a 50 mm sphere)",
        "Units": "mm",
    },
    "eddy_pe_offset": {"Description": "Eddy-current translation along phase encoding", "Units": "voxel"},
    "eddy_pe_i": {"Description": "Eddy-current shear of the PE coordinate per voxel along i", "Units": "1"},
    "eddy_pe_j": {"Description": "Eddy-current shear/scale of the PE coordinate per voxel along j", "Units": "1"},
    "eddy_pe_k": {"Description": "Eddy-current shear of the PE coordinate per voxel along k", "Units": "1"},
}


def _out(runtime, name: str) -> str:
    return str(Path(runtime.cwd) / name)


def _set_threads(n: int | None) -> None:
    if n and n > 0:
        import torch

        torch.set_num_threads(int(n))


def _b0_mean_of(path: str, b0_threshold: float = B0_THRESHOLD) -> tuple[np.ndarray, Any, str]:
    """Mean of the b0 volumes of an image (all volumes of an EPI fieldmap without .bval)."""
    import nibabel as nib

    img = nib.load(path)
    data = np.asarray(img.dataobj, dtype=np.float32)
    how = "single volume"
    if data.ndim == 4:
        bval = Path(str(path).replace(".nii.gz", "").replace(".nii", "") + ".bval")
        if bval.exists():
            from bids_uad.bids.gradients import read_bvals

            b = read_bvals(bval)
            if b.size != data.shape[3]:
                raise InputValidationError(f"{b.size} b-values for {data.shape[3]} volumes", bval)
            sel = b <= b0_threshold
            if not sel.any():
                raise InputValidationError("the reverse phase-encoding series has no b0 volume", bval)
            data = data[..., sel]
            how = f"mean of {int(sel.sum())} b0 volume(s) (from .bval)"
        else:
            how = f"mean of {data.shape[3]} volume(s)"
        data = data.mean(-1)
    return data, img, how


# --------------------------------------------------------------------------------------------
class _DenoiseInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True)
    bval_file = File(exists=True, mandatory=True)
    denoise = traits.Enum("none", "mppca", "patch2self", usedefault=True)
    gibbs = traits.Bool(False, usedefault=True)


class _DenoiseOutputSpec(TraitedSpec):
    out_file = File(exists=True)
    report = traits.Dict()


class DenoiseDWI(SimpleInterface):
    """Optional MP-PCA / Patch2Self denoising then Gibbs-ringing removal (dipy)."""

    input_spec = _DenoiseInputSpec
    output_spec = _DenoiseOutputSpec

    def _run_interface(self, runtime):
        import nibabel as nib

        from bids_uad.algorithms.denoise import denoise_series, remove_gibbs
        from bids_uad.bids.gradients import read_bvals

        report = {"Denoising": "None", "GibbsRingingRemoval": False}
        if self.inputs.denoise == "none" and not self.inputs.gibbs:
            self._results["out_file"] = self.inputs.in_file
            self._results["report"] = report
            return runtime
        img = nib.load(self.inputs.in_file)
        data = np.asarray(img.dataobj, dtype=np.float32)
        if self.inputs.denoise != "none":
            data = denoise_series(data, read_bvals(self.inputs.bval_file), self.inputs.denoise)
            report["Denoising"] = f"dipy {self.inputs.denoise}"
        if self.inputs.gibbs:
            data = remove_gibbs(data)
            report["GibbsRingingRemoval"] = "dipy gibbs_removal (Kellner 2016)"
        out = work_nifti(runtime.cwd, "dwi_denoised")
        nib.save(nib.Nifti1Image(data, img.affine, img.header), out)
        self._results["out_file"] = out
        self._results["report"] = report
        return runtime


# --------------------------------------------------------------------------------------------
class _EstimateSDCInputSpec(BaseInterfaceInputSpec):
    dwi_file = File(exists=True, mandatory=True)
    bval_file = File(exists=True, mandatory=True)
    bvec_file = File(exists=True, mandatory=True)
    dwi_metadata = traits.Dict(mandatory=True)
    rpe_file = traits.Str("", usedefault=True, desc="reverse-PE image or '' when none")
    rpe_metadata = traits.Dict(desc="sidecar of the reverse-PE image")
    num_threads = traits.Int(1, usedefault=True)


class _EstimateSDCOutputSpec(TraitedSpec):
    fieldmap_hz = traits.Str(desc="field in Hz on the dwi grid, or '' when skipped")
    b0_pair_raw = traits.List(traits.Str)
    b0_pair_corrected = traits.List(traits.Str)
    pe_direction = traits.Str(desc="PE direction; only its axis (i, j, k) when the polarity is unknown")
    readout_scale = traits.Float(desc="TotalReadoutTime * polarity of the dwi (0 if unknown)")
    report = traits.Dict()
    partner = traits.Dict(desc="what TransferSDC needs to correct the reverse-PE run of a full-DTI pair "
                               "with this field ({} when no field was fitted)")


class EstimateSDC(SimpleInterface):
    """Validate the PE metadata, then fit the susceptibility field from the reverse-PE b0 pair."""

    input_spec = _EstimateSDCInputSpec
    output_spec = _EstimateSDCOutputSpec

    def _run_interface(self, runtime):
        import nibabel as nib

        from bids_uad.algorithms.resample import resample_to_grid, same_grid
        from bids_uad.algorithms.sdc import estimate_sdc
        from bids_uad.bids.gradients import load_gradients

        _set_threads(self.inputs.num_threads)
        dwi_json = sidecar_of(self.inputs.dwi_file)
        meta = dict(self.inputs.dwi_metadata or {})
        img = nib.load(self.inputs.dwi_file)
        if img.ndim != 4:
            raise InputValidationError(f"the dwi image is {img.ndim}-D, expected 4-D", self.inputs.dwi_file)
        gt = load_gradients(self.inputs.bval_file, self.inputs.bvec_file, n_volumes=img.shape[3],
                            image_path=self.inputs.dwi_file)
        first_b0 = int(np.flatnonzero(gt.b0_mask)[0])
        b0 = np.asarray(img.dataobj[..., first_b0], dtype=np.float32)
        # without a polarity the PE axis alone is handed on: the eddy-current model needs only the axis
        self._results.update(fieldmap_hz="", b0_pair_raw=[], b0_pair_corrected=[],
                             pe_direction=str(meta.get("PhaseEncodingDirection") or meta.get("PhaseEncodingAxis", "")),
                             readout_scale=0.0, partner={})
        rpe = self.inputs.rpe_file or ""
        if not rpe:
            LOGGER.warning("%s: no reverse phase-encoding image; susceptibility distortion correction "
                           "skipped", Path(self.inputs.dwi_file).name)
            if meta.get("PhaseEncodingDirection"):
                axis, pol = phase_encoding(meta, dwi_json)
                try:
                    self._results["readout_scale"] = pol * total_readout_time(meta, img.shape[axis], dwi_json)
                except InputValidationError:
                    self._results["readout_scale"] = 0.0
            self._results["report"] = {"SusceptibilityDistortionCorrection": SDC_SKIPPED}
            return runtime
        rpe_json = sidecar_of(rpe)
        rmeta = dict(self.inputs.rpe_metadata or {}) if isdefined(self.inputs.rpe_metadata) else {}
        axis, pol = phase_encoding(meta, dwi_json)
        raxis, rpol = phase_encoding(rmeta, rpe_json)
        if raxis != axis:
            raise InputValidationError(
                f"reverse phase-encoding image has PE axis {rmeta['PhaseEncodingDirection']!r} but the dwi has "
                f"{meta['PhaseEncodingDirection']!r}: the pair must share the PE axis", rpe_json)
        if rpol == pol:
            raise InputValidationError(
                f"reverse phase-encoding image has the same polarity ({rmeta['PhaseEncodingDirection']!r}) "
                "as the dwi: it must be the opposite", rpe_json)
        rimg_data, rimg, how = _b0_mean_of(rpe)
        if rimg_data.ndim != 3:
            raise InputValidationError(f"reverse phase-encoding image is {rimg_data.ndim}-D", rpe)
        rtrt, rtrt_source = readout_time_or_nominal(rmeta, rimg.shape[raxis], rpe_json)
        trt, trt_source = readout_time_or_nominal(meta, img.shape[axis], dwi_json, partner=(rtrt, rtrt_source))
        if rtrt_source.startswith("nominal") and not trt_source.startswith("nominal"):
            rtrt, rtrt_source = trt, "the other image of the pair (not in this sidecar; same protocol assumed)"
        resampled = False
        if not same_grid(rimg.shape, rimg.affine, img.shape, img.affine):
            LOGGER.warning("%s: grid differs from the dwi; resampled to the dwi grid", Path(rpe).name)
            rimg_data = resample_to_grid(rimg_data, rimg.affine, img.shape[:3], img.affine, order=1)
            resampled = True
        res = estimate_sdc([b0, rimg_data], [trt * pol, rtrt * rpol], axis, zooms=img.header.get_zooms()[:3])
        hdr = img.header.copy()
        hdr.set_data_dtype(np.float32)
        affine = img.affine
        names = {}
        for key, arr in (("fieldmap_hz", res.field_hz), ("raw_dwi", b0), ("raw_rpe", rimg_data),
                         ("cor_dwi", res.corrected[0]), ("cor_rpe", res.corrected[1])):
            names[key] = work_nifti(runtime.cwd, f"sdc_{key}")
            out = nib.Nifti1Image(np.asarray(arr, np.float32), affine)
            out.header.set_xyzt_units("mm", "sec")
            nib.save(out, names[key])
        self._results.update(
            fieldmap_hz=names["fieldmap_hz"],
            b0_pair_raw=[names["raw_dwi"], names["raw_rpe"]],
            b0_pair_corrected=[names["cor_dwi"], names["cor_rpe"]],
            readout_scale=float(trt * pol),
        )
        self._results["report"] = {
            "SusceptibilityDistortionCorrection": "TOPUP model, bids_uad python (torch B-spline field)",
            "SDCSettings": {
                "PhaseEncodingDirection": meta["PhaseEncodingDirection"],
                "ReversePhaseEncodingDirection": rmeta["PhaseEncodingDirection"],
                "TotalReadoutTime": trt, "ReverseTotalReadoutTime": rtrt,
                "TotalReadoutTimeSource": trt_source, "ReverseTotalReadoutTimeSource": rtrt_source,
                "PhaseEncodingDirectionSource": meta.get(PE_SOURCE_KEY, "sidecar PhaseEncodingDirection"),
                "ReversePhaseEncodingDirectionSource": rmeta.get(PE_SOURCE_KEY, "sidecar PhaseEncodingDirection"),
                "ReversePEImage": Path(rpe).name, "ReversePEb0": how,
                "ReversePEResampledToDwiGrid": resampled, **res.info,
            },
        }
        self._results["partner"] = {
            "field_file": names["fieldmap_hz"], "source": Path(self.inputs.dwi_file).name,
            "source_image": str(self.inputs.dwi_file), "movement": [float(v) for v in res.movement[1]],
            "readout_scale": float(rtrt * rpol), "pe_direction": str(rmeta["PhaseEncodingDirection"]),
            "raw_b0": names["raw_rpe"], "partner_raw_b0": names["raw_dwi"],
            "partner_corrected_b0": names["cor_dwi"], "settings": dict(self._results["report"]["SDCSettings"]),
        }
        return runtime


# --------------------------------------------------------------------------------------------
class _TransferSDCInputSpec(BaseInterfaceInputSpec):
    dwi_file = File(exists=True, mandatory=True)
    partner = traits.Dict(mandatory=True, desc="EstimateSDC's ``partner`` output of the other run")
    num_threads = traits.Int(1, usedefault=True)


class TransferSDC(SimpleInterface):
    """The second run of an opposite-PE full-DTI pair: reuse the field fitted once for the pair.

    :class:`EstimateSDC` of the first run fits the field on that run's b0 grid together with the
    pose of this run's b0s; here the field is moved into this run's frame
    (:func:`~bids_uad.algorithms.sdc.field_in_moved_frame`) instead of being fitted a second
    time with the roles swapped (same data, twice the time, two slightly different fields).
    Outputs as :class:`EstimateSDC`'s.
    """

    input_spec = _TransferSDCInputSpec
    output_spec = _EstimateSDCOutputSpec

    def _run_interface(self, runtime):
        import nibabel as nib

        from bids_uad.algorithms.resample import parse_phase_encoding, resample_to_grid, same_grid
        from bids_uad.algorithms.sdc import apply_sdc, field_in_moved_frame

        _set_threads(self.inputs.num_threads)
        part = dict(self.inputs.partner)
        self._results.update(fieldmap_hz="", b0_pair_raw=[], b0_pair_corrected=[], pe_direction="",
                             readout_scale=0.0, partner={})
        if not part.get("field_file"):
            LOGGER.warning("%s: the field of its opposite phase-encoding pair was not fitted; susceptibility "
                           "distortion correction skipped", Path(self.inputs.dwi_file).name)
            self._results["report"] = {"SusceptibilityDistortionCorrection": SDC_SKIPPED}
            return runtime
        img = nib.load(self.inputs.dwi_file)
        fimg = nib.load(part["field_file"])
        zooms = fimg.header.get_zooms()[:3]
        moved = field_in_moved_frame(np.asarray(fimg.dataobj, np.float32), part["movement"], zooms)
        field = moved
        if not same_grid(fimg.shape, fimg.affine, img.shape[:3], img.affine):
            field = resample_to_grid(moved, fimg.affine, img.shape[:3], img.affine, order=1)
        axis, _ = parse_phase_encoding(part["pe_direction"])
        scale = float(part["readout_scale"])
        names = {key: work_nifti(runtime.cwd, f"sdc_{key}") for key in ("fieldmap_hz", "cor_dwi", "cor_rpe")}
        # the pair's b0s corrected, in this run's frame (for the report): this run's with the moved
        # field, the other run's corrected b0 moved by the same pose
        partner_here = field_in_moved_frame(np.asarray(nib.load(part["partner_corrected_b0"]).dataobj, np.float32),
                                            part["movement"], zooms)
        own = apply_sdc(np.asarray(nib.load(part["raw_b0"]).dataobj, np.float32), moved, axis, scale)
        for key, arr, affine in (("fieldmap_hz", field, img.affine), ("cor_dwi", own, fimg.affine),
                                 ("cor_rpe", partner_here, fimg.affine)):
            out = nib.Nifti1Image(np.asarray(arr, np.float32), affine)
            out.header.set_xyzt_units("mm", "sec")
            nib.save(out, names[key])
        settings = dict(part["settings"])
        swap = {"PhaseEncodingDirection": "ReversePhaseEncodingDirection", "TotalReadoutTime": "ReverseTotalReadoutTime",
                "TotalReadoutTimeSource": "ReverseTotalReadoutTimeSource",
                "PhaseEncodingDirectionSource": "ReversePhaseEncodingDirectionSource"}
        for a, b in swap.items():
            settings[a], settings[b] = settings.get(b), settings.get(a)
        # the movement of the other run's b0 as seen from this run: the inverse pose
        from bids_uad.algorithms.hmc import matrix_to_params, params_to_matrix
        from bids_uad.algorithms.sdc import MOVEMENT_COLUMNS, movement_summary

        inverse = matrix_to_params(np.linalg.inv(params_to_matrix(np.asarray(part["movement"], float))))
        settings["movement"] = movement_summary(np.vstack([np.zeros(6), inverse]), [(1, MOVEMENT_COLUMNS[axis])])
        settings.update(ReversePEImage=part["source"],
                        FieldEstimatedWith=f"the run {part['source']} (one fit for the pair); moved into this "
                                           "run's frame with the pose of this run's b0 found by that fit",
                        FieldPoseOfThisRun=[round(v, 5) for v in part["movement"]])
        self._results.update(
            fieldmap_hz=names["fieldmap_hz"], b0_pair_raw=[part["raw_b0"], part["partner_raw_b0"]],
            b0_pair_corrected=[names["cor_dwi"], names["cor_rpe"]], pe_direction=part["pe_direction"],
            readout_scale=scale)
        self._results["report"] = {
            "SusceptibilityDistortionCorrection": "TOPUP model, bids_uad python (torch B-spline field)",
            "SDCSettings": settings}
        return runtime


# --------------------------------------------------------------------------------------------
class _MotionCorrectInputSpec(BaseInterfaceInputSpec):
    dwi_file = File(exists=True, mandatory=True)
    bval_file = File(exists=True, mandatory=True)
    bvec_file = File(exists=True, mandatory=True)
    fieldmap_hz = traits.Str("", usedefault=True, desc="field (Hz) on the dwi grid or ''")
    pe_direction = traits.Str("", usedefault=True)
    readout_scale = traits.Float(0.0, usedefault=True)
    eddy = traits.Bool(True, usedefault=True, desc="model eddy currents along PE")
    num_threads = traits.Int(1, usedefault=True)


class _MotionCorrectOutputSpec(TraitedSpec):
    out_file = File(exists=True)
    out_bval = File(exists=True)
    out_bvec = File(exists=True)
    b0_ref = File(exists=True)
    motion_tsv = File(exists=True)
    fov_mask = File(exists=True, desc="voxels whose every volume was sampled inside the acquired field of view")
    report = traits.Dict()


class MotionCorrect(SimpleInterface):
    """Head motion + eddy currents (+ SDC in the same interpolation); rotated b-vectors; TSV."""

    input_spec = _MotionCorrectInputSpec
    output_spec = _MotionCorrectOutputSpec

    def _run_interface(self, runtime):
        import nibabel as nib

        from bids_uad.algorithms.hmc import FOV_COVERAGE_MIN, correct_motion
        from bids_uad.algorithms.resample import parse_phase_encoding
        from bids_uad.bids.derivatives import write_tsv
        from bids_uad.bids.gradients import GradientTable, load_gradients, write_fsl_gradients

        _set_threads(self.inputs.num_threads)
        img = nib.load(self.inputs.dwi_file)
        data = np.asarray(img.dataobj, dtype=np.float32)
        gt = load_gradients(self.inputs.bval_file, self.inputs.bvec_file, n_volumes=data.shape[3],
                            image_path=self.inputs.dwi_file)
        pe_axis = None
        if self.inputs.pe_direction:
            pe_axis = parse_phase_encoding(self.inputs.pe_direction)[0]
        disp = None
        if self.inputs.fieldmap_hz:
            if pe_axis is None or not self.inputs.readout_scale:
                raise InputValidationError("a field map needs the PE direction and readout time",
                                           sidecar_of(self.inputs.dwi_file))
            disp = np.asarray(nib.load(self.inputs.fieldmap_hz).dataobj, np.float32) * self.inputs.readout_scale
        zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
        res = correct_motion(data, gt.bvals, gt.bvecs, zooms, pe_axis=pe_axis, disp_vox=disp,
                             eddy=self.inputs.eddy, affine_det_positive=np.linalg.det(img.affine[:3, :3]) > 0)
        corrected = np.clip(res.corrected, 0, None).astype(np.float32)
        hdr = img.header.copy()
        hdr.set_data_dtype(np.float32)
        out = work_nifti(runtime.cwd, "dwi_preproc")
        nib.save(nib.Nifti1Image(corrected, img.affine, hdr), out)
        b0_ref = corrected[..., gt.b0_mask].mean(-1)
        ref = work_nifti(runtime.cwd, "dwi_b0ref")
        nib.save(nib.Nifti1Image(b0_ref.astype(np.float32), img.affine), ref)
        new = GradientTable(bvals=gt.bvals, bvecs=res.bvecs, b0_threshold=gt.b0_threshold)
        bval, bvec = _out(runtime, "dwi_preproc.bval"), _out(runtime, "dwi_preproc.bvec")
        write_fsl_gradients(new, bval, bvec)
        rows = []
        for i in range(data.shape[3]):
            row = dict(zip(MOTION_COLUMNS[:6], res.motion[i]))
            row["framewise_displacement"] = res.framewise_displacement[i]
            if pe_axis is not None:
                row.update(dict(zip(("eddy_pe_offset", "eddy_pe_i", "eddy_pe_j", "eddy_pe_k"), res.eddy[i])))
            rows.append(row)
        tsv = _out(runtime, "motion.tsv")
        write_tsv(tsv, rows)
        covered = res.coverage >= FOV_COVERAGE_MIN
        fov = work_nifti(runtime.cwd, "fov_mask")
        nib.save(nib.Nifti1Image(covered.astype(np.uint8), img.affine), fov)
        self._results.update(out_file=out, out_bval=bval, out_bvec=bvec, b0_ref=ref, motion_tsv=tsv, fov_mask=fov)
        self._results["report"] = {
            "HeadMotionCorrection": "bids_uad python: per-volume rigid + eddy-current (affine along PE) "
                                    "registration, b0s to b0 reference, DWIs to leave-one-out tensor prediction",
            "HMCSettings": res.info,
            "BvecsRotated": True,
            "SingleInterpolation": "motion, eddy currents and susceptibility field applied in one trilinear "
                                   "resampling with Jacobian modulation" if disp is not None else
                                   "motion and eddy currents applied in one trilinear resampling",
            "MeanFramewiseDisplacement": float(np.nanmean(res.framewise_displacement))
            if data.shape[3] > 1 else 0.0,
            "FieldOfViewCoverage": {
                "VoxelsOutside": int((~covered).sum()),
                "Criterion": f"in every volume at least {FOV_COVERAGE_MIN:.0%} of the voxel's interpolation weight "
                             "from acquired voxels (motion, eddy and susceptibility shifts move sample points past "
                             "the slab's edges); the voxels outside are left out of the analysis mask"},
        }
        return runtime


# --------------------------------------------------------------------------------------------
class _BrainMaskInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True)
    method = traits.Enum("otsu", "median_otsu", usedefault=True)


class _BrainMaskOutputSpec(TraitedSpec):
    out_mask = File(exists=True)
    report = traits.Dict()


class BrainMask(SimpleInterface):
    """Brain mask of the corrected mean b0."""

    input_spec = _BrainMaskInputSpec
    output_spec = _BrainMaskOutputSpec

    def _run_interface(self, runtime):
        import nibabel as nib

        from bids_uad.algorithms.masking import brain_mask, coverage_summary

        img = nib.load(self.inputs.in_file)
        mask = brain_mask(np.asarray(img.dataobj, np.float32), method=self.inputs.method)
        coverage = coverage_summary(mask, img.header.get_zooms())
        if not coverage["WholeBrain"]:
            LOGGER.warning("dwi brain mask is cut by the field of view along %s (extent %s mm): "
                           "partial brain coverage (slab); volumes and template fits cover only this part",
                           "/".join(coverage["CutAxes"]), coverage["BrainExtentMm"])
        out = work_nifti(runtime.cwd, "brain_mask")
        m = nib.Nifti1Image(mask.astype(np.uint8), img.affine)
        m.header.set_data_dtype(np.uint8)
        nib.save(m, out)
        self._results["out_mask"] = out
        self._results["report"] = {"BrainMask": f"bids_uad python ({self.inputs.method} on the corrected mean b0)",
                                   "Coverage": coverage}
        return runtime


# --------------------------------------------------------------------------------------------
class _TensorInputSpec(BaseInterfaceInputSpec):
    dwi_file = File(exists=True, mandatory=True)
    bval_file = File(exists=True, mandatory=True)
    bvec_file = File(exists=True, mandatory=True)
    mask_file = File(exists=True, mandatory=True)


class _TensorOutputSpec(TraitedSpec):
    fa = File(exists=True)
    md = File(exists=True)
    ad = File(exists=True)
    rd = File(exists=True)
    s0 = File(exists=True)
    report = traits.Dict()


class TensorFit(SimpleInterface):
    """WLS diffusion tensor fit -> FA, MD, AD, RD, S0 maps."""

    input_spec = _TensorInputSpec
    output_spec = _TensorOutputSpec

    def _run_interface(self, runtime):
        import nibabel as nib

        from bids_uad.algorithms.tensor import TENSOR_MAPS, fit_tensor
        from bids_uad.bids.gradients import load_gradients

        img = nib.load(self.inputs.dwi_file)
        data = np.asarray(img.dataobj, np.float32)
        gt = load_gradients(self.inputs.bval_file, self.inputs.bvec_file, n_volumes=data.shape[3])
        mask = np.asarray(nib.load(self.inputs.mask_file).dataobj) > 0
        maps = fit_tensor(data, gt.bvals, gt.bvecs, mask, b0_threshold=gt.b0_threshold)
        for key in TENSOR_MAPS:
            out = work_nifti(runtime.cwd, f"tensor_{key}")
            nib.save(nib.Nifti1Image(maps[key], img.affine), out)
            self._results[key] = out
        self._results["report"] = {"TensorFit": "dipy TensorModel, weighted least squares (WLS)",
                                   "Shells": list(gt.shells)}
        return runtime


# --------------------------------------------------------------------------------------------
class _MergeReportsInputSpec(BaseInterfaceInputSpec):
    backend = traits.Str(mandatory=True)
    denoise = traits.Dict()
    sdc = traits.Dict()
    hmc = traits.Dict()
    mask = traits.Dict()
    tensor = traits.Dict()
    combine = traits.Dict(desc="CombineRuns' report, for a series combined from several runs")


class _MergeReportsOutputSpec(TraitedSpec):
    backend_report = traits.Dict()
    dwi_meta = traits.Dict(desc="sidecar of the preprocessed dwi")
    field_meta = traits.Dict()
    motion_meta = traits.Dict()
    mask_meta = traits.Dict()
    tensor_meta = traits.Dict()
    ref_meta = traits.Dict()


class MergeReports(SimpleInterface):
    """Collect what ran in each step (backend and key settings) into sidecar dictionaries."""

    input_spec = _MergeReportsInputSpec
    output_spec = _MergeReportsOutputSpec

    def _run_interface(self, runtime):
        def get(name):
            value = getattr(self.inputs, name)
            return dict(value) if isdefined(value) and value else {}

        sdc, hmc, den, mask, ten = get("sdc"), get("hmc"), get("denoise"), get("mask"), get("tensor")
        comb = get("combine")
        sdc_line = sdc.get("SusceptibilityDistortionCorrection",
                           comb.get("SusceptibilityDistortionCorrection", SDC_SKIPPED))
        report = {"Backend": self.inputs.backend, **den, **comb, **sdc, **hmc, **mask, **ten}
        report.setdefault("SusceptibilityDistortionCorrection", sdc_line)
        common = {"PreprocessingBackend": self.inputs.backend, "SusceptibilityDistortionCorrection": sdc_line}
        if comb:
            common["CombinedRuns"] = comb.get("CombinedRuns", [])
        self._results["backend_report"] = report
        self._results["dwi_meta"] = {k: v for k, v in report.items() if k not in ("BrainMask", "TensorFit", "Shells")}
        self._results["ref_meta"] = {**common, "Description": "b0 reference: mean of the corrected b0 volumes",
                                     "HeadMotionCorrection": hmc.get("HeadMotionCorrection", "")}
        self._results["field_meta"] = {**sdc, "Units": "Hz", "PreprocessingBackend": self.inputs.backend,
                                       "Description": "Off-resonance field on the dwi grid; displacement "
                                                      "(voxels along PE) = field * TotalReadoutTime * polarity"}
        self._results["motion_meta"] = {**MOTION_COLUMN_DESCRIPTIONS, **common,
                                        "HeadMotionCorrection": hmc.get("HeadMotionCorrection", "")}
        self._results["mask_meta"] = {**common, "Type": "Brain", **mask}
        self._results["tensor_meta"] = {**common, **ten}
        return runtime




# --------------------------------------------------------------------------------------------
class _CombineRunsInputSpec(BaseInterfaceInputSpec):
    dwi_files = traits.List(File(exists=True), mandatory=True, minlen=2)
    bval_files = traits.List(File(exists=True), mandatory=True, minlen=2)
    bvec_files = traits.List(File(exists=True), mandatory=True, minlen=2)
    b0_refs = traits.List(File(exists=True), mandatory=True, minlen=2)
    brain_mask = File(exists=True, mandatory=True, desc="brain mask of the first run")
    run_names = traits.List(traits.Str, desc="raw file names of the runs, for the sidecar")
    run_reports = traits.List(traits.Dict, desc="each run's preprocessing report (MergeReports.backend_report)")
    fov_masks = traits.List(traits.Str, desc="each run's field-of-view mask ('' for a run without one)")
    num_threads = traits.Int(1, usedefault=True)


class _CombineRunsOutputSpec(TraitedSpec):
    out_file = File(exists=True)
    out_bval = File(exists=True)
    out_bvec = File(exists=True)
    b0_ref = File(exists=True)
    fov_mask = traits.Str(desc="the combined series' field-of-view mask ('' when a run has none)")
    report = traits.Dict()


class CombineRuns(SimpleInterface):
    """Corrected opposite-PE runs → one series on the first run's grid (``algorithms.combine``)."""

    input_spec = _CombineRunsInputSpec
    output_spec = _CombineRunsOutputSpec

    def _run_interface(self, runtime):
        import nibabel as nib

        from bids_uad.algorithms.combine import combine_runs
        from bids_uad.algorithms.resample import same_grid
        from bids_uad.bids.gradients import GradientTable, load_gradients, write_fsl_gradients

        _set_threads(self.inputs.num_threads)
        imgs = [nib.load(f) for f in self.inputs.dwi_files]
        for path, img in zip(self.inputs.dwi_files[1:], imgs[1:]):
            if not same_grid(img.shape, img.affine, imgs[0].shape, imgs[0].affine):
                raise InputValidationError("the opposite phase-encoding runs of a pair must share one grid "
                                           f"to be combined ({Path(self.inputs.dwi_files[0]).name} differs)", path)
        tables = [load_gradients(b, v, n_volumes=i.shape[3]) for b, v, i in
                  zip(self.inputs.bval_files, self.inputs.bvec_files, imgs)]
        series = [np.asarray(i.dataobj, np.float32) for i in imgs]
        refs = [np.asarray(nib.load(f).dataobj, np.float32) for f in self.inputs.b0_refs]
        mask = np.asarray(nib.load(self.inputs.brain_mask).dataobj) > 0
        zooms = tuple(float(z) for z in imgs[0].header.get_zooms()[:3])
        res = combine_runs(series, [t.bvals for t in tables], [t.bvecs for t in tables], refs, zooms, mask=mask,
                           b0_threshold=tables[0].b0_threshold,
                           affine_det_positive=np.linalg.det(imgs[0].affine[:3, :3]) > 0)
        hdr = imgs[0].header.copy()
        hdr.set_data_dtype(np.float32)
        out = work_nifti(runtime.cwd, "dwi_combined")
        nib.save(nib.Nifti1Image(res.data.astype(np.float32), imgs[0].affine, hdr), out)
        ref = work_nifti(runtime.cwd, "dwi_combined_b0ref")
        nib.save(nib.Nifti1Image(res.b0_ref.astype(np.float32), imgs[0].affine), ref)
        bval, bvec = _out(runtime, "dwi_combined.bval"), _out(runtime, "dwi_combined.bvec")
        write_fsl_gradients(GradientTable(bvals=res.bvals, bvecs=res.bvecs, b0_threshold=tables[0].b0_threshold),
                            bval, bvec)
        names = list(self.inputs.run_names) if isdefined(self.inputs.run_names) else \
            [Path(f).name for f in self.inputs.dwi_files]
        for name, run in zip(names, res.info["runs"]):
            run["run"] = name
        self._results.update(out_file=out, out_bval=bval, out_bvec=bvec, b0_ref=ref, fov_mask="")
        fovs = list(self.inputs.fov_masks) if isdefined(self.inputs.fov_masks) else []
        if len(fovs) == len(imgs) and all(fovs):
            from bids_uad.algorithms.combine import combined_fov

            fov = combined_fov([np.asarray(nib.load(f).dataobj) > 0 for f in fovs],
                               [run["params"] for run in res.info["runs"]], zooms)
            self._results["fov_mask"] = work_nifti(runtime.cwd, "fov_mask")
            nib.save(nib.Nifti1Image(fov.astype(np.uint8), imgs[0].affine), self._results["fov_mask"])
        per_run = list(self.inputs.run_reports) if isdefined(self.inputs.run_reports) else []
        sdc_lines = sorted({r.get("SusceptibilityDistortionCorrection", SDC_SKIPPED) for r in per_run})
        self._results["report"] = {
            "CombinedRuns": names,
            **({"SusceptibilityDistortionCorrection": "; ".join(sdc_lines)} if sdc_lines else {}),
            "PerRunPreprocessing": {name: {k: r[k] for k in ("SDCSettings", "HeadMotionCorrection",
                                                              "MeanFramewiseDisplacement") if k in r}
                                    for name, r in zip(names, per_run)},
            "RunCombination": "each run corrected on its own (susceptibility field from both runs' b0s, "
                              "head motion, eddy currents), then " + res.info["method"]
                              + " (as QSIPrep after correction)",
            "RunCombinationSettings": res.info,
        }
        return runtime


# --------------------------------------------------------------------------------------------
class _DiffusionTissuesInputSpec(BaseInterfaceInputSpec):
    fa = File(exists=True, mandatory=True)
    md = File(exists=True, mandatory=True)
    brain_mask = File(exists=True, mandatory=True)
    fov_mask = traits.Str("", usedefault=True, desc="optional: the field-of-view mask (hmc.fov_coverage)")


class _DiffusionTissuesOutputSpec(TraitedSpec):
    dseg = File(exists=True)
    dseg_tsv = File(exists=True)
    analysis_mask = File(exists=True)
    dseg_meta = traits.Dict()
    analysis_meta = traits.Dict()


class DiffusionTissues(SimpleInterface):
    """CSF/GM/WM from FA and MD (no T1w) and the analysis mask GM ∪ WM on the dwi grid."""

    input_spec = _DiffusionTissuesInputSpec
    output_spec = _DiffusionTissuesOutputSpec

    def _run_interface(self, runtime):
        import nibabel as nib

        from bids_uad.algorithms.masking import coverage_summary, interior
        from bids_uad.algorithms.segmentation import analysis_mask, diffusion_tissue_classes, dseg_tsv_rows
        from bids_uad.bids.derivatives import write_tsv

        fa_img = nib.load(self.inputs.fa)
        fa = np.asarray(fa_img.dataobj, np.float32)
        md = np.asarray(nib.load(self.inputs.md).dataobj, np.float32)
        mask = np.asarray(nib.load(self.inputs.brain_mask).dataobj) > 0
        dseg, info = diffusion_tissue_classes(fa, md, mask)
        analysis = analysis_mask(dseg) & interior(mask)
        if self.inputs.fov_mask:
            analysis &= np.asarray(nib.load(self.inputs.fov_mask).dataobj).reshape(analysis.shape) > 0
        names = {}
        for key, arr in (("dseg", dseg), ("analysis_mask", analysis.astype(np.uint8))):
            names[key] = work_nifti(runtime.cwd, key)
            img = nib.Nifti1Image(arr.astype(np.uint8), fa_img.affine)
            img.header.set_data_dtype(np.uint8)
            nib.save(img, names[key])
        tsv = _out(runtime, "dseg.tsv")
        write_tsv(tsv, dseg_tsv_rows())
        how = "tissue classes from the diffusion data (no T1w): " + info.get("method", info.get("error", ""))
        self._results.update(dseg=names["dseg"], dseg_tsv=tsv, analysis_mask=names["analysis_mask"])
        self._results["dseg_meta"] = {"TissueClasses": how, "TissueClassSettings": info}
        self._results["analysis_meta"] = {
            "Type": "ROI", "TissueClasses": how,
            "Description": "GM and WM from the diffusion tissue classes (CSF excluded), within the dwi brain mask's "
                           "interior (its boundary layer left out) and the part of the field of view every dwi "
                           "volume covers after correction",
            "Coverage": coverage_summary(analysis, fa_img.header.get_zooms())}
        return runtime


# --------------------------------------------------------------------------------------------
class _FAToTemplateInputSpec(BaseInterfaceInputSpec):
    fa = File(exists=True, mandatory=True)
    brain_mask = File(exists=True, mandatory=True)
    output_spaces = traits.List(traits.Str, mandatory=True)
    seed = traits.Int(0, usedefault=True)
    num_threads = traits.Int(1, usedefault=True)


class _FAToTemplateOutputSpec(TraitedSpec):
    xfm = File(exists=True, desc="composite transform dwi -> template")
    fa_template = File(exists=True)
    meta = traits.Dict()


class FAToTemplate(SimpleInterface):
    """Without a T1w: the subject's FA registered to an FA-like template (affine + SyN, MI)."""

    input_spec = _FAToTemplateInputSpec
    output_spec = _FAToTemplateOutputSpec

    def _run_interface(self, runtime):
        import nibabel as nib

        from bids_uad.algorithms.registration import apply_transforms, register_fa_to_template
        from bids_uad.algorithms.templates import fa_like_template, template_for_output_spaces

        template = template_for_output_spaces(self.inputs.output_spaces)
        target, target_mask = fa_like_template(template)
        fa = nib.load(self.inputs.fa)
        if not np.any(np.asarray(nib.load(self.inputs.brain_mask).dataobj)):
            raise RuntimeError(f"{self.inputs.brain_mask}: the dwi brain mask is empty, so FA cannot be registered "
                               "to the template (check the b0; --output-spaces dwi skips template space)")
        result, quality = register_fa_to_template(fa, nib.load(self.inputs.brain_mask), target, target_mask,
                                                  out_prefix=_out(runtime, "fa2tpl_"), seed=self.inputs.seed,
                                                  threads=self.inputs.num_threads)
        warped = work_nifti(runtime.cwd, "fa_template")
        nib.save(apply_transforms(fa, target, result.forward, "image"), warped)
        if quality["FACorrelationWithTemplate"] < 0.4:
            LOGGER.warning("FA to template registration is poor (correlation %.2f with the FA-like template)",
                           quality["FACorrelationWithTemplate"])
        self._results.update(xfm=result.forward[0], fa_template=warped)
        self._results["meta"] = {
            "TemplateRegistration": "no T1w: tensor FA -> FA-like template (template tissue priors weighted by "
                                    "typical FA), ANTs affine then SyN, Mattes MI, brain masks of both",
            "Template": template.name, "TemplateRegistrationQuality": quality}
        return runtime
