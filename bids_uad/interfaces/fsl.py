"""FSL backend of diffusion preprocessing: ``topup``/``applytopup``, ``eddy``, ``bet``.

Each FSL step is a configured nipype interface built by a small function (so tests can check
the command line nipype builds without FSL installed).  :class:`FSLDWIPreproc` runs them in
sequence inside one node, because whether ``topup`` runs depends on the inputs (a subject may
have no reverse phase-encoding image) and nipype graphs are fixed when built.  Outputs have the
same names and meaning as the Python backend's.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from nipype.interfaces import fsl
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)

from bids_uad.bids.layout import sidecar_of
from bids_uad.bids.validate import phase_encoding, total_readout_time
from bids_uad.interfaces.dwi import SDC_SKIPPED, _b0_mean_of, _out

LOGGER = logging.getLogger("bids_uad.dwi")

#: FSL's acqparams rows: PE unit vector (in voxel axes) and readout time.
_PE_VECTORS = {0: (1, 0, 0), 1: (0, 1, 0), 2: (0, 0, 1)}


def acqparams_lines(pe_axis: int, polarities: list[int], readout_times: list[float]) -> str:
    """The ``--datain``/``--acqp`` text: one line per acquisition, ``x y z TotalReadoutTime``."""
    rows = []
    for pol, trt in zip(polarities, readout_times):
        vec = [pol * v for v in _PE_VECTORS[pe_axis]]
        rows.append(" ".join(str(v) for v in vec) + f" {trt:.6f}")
    return "\n".join(rows) + "\n"


def topup_interface(in_file: str, encoding_file: str, out_base: str = "topup", config: str = "b02b0.cnf"):
    """``topup`` on a merged b0 pair (field in Hz in ``out_field``)."""
    tu = fsl.TOPUP()
    tu.inputs.in_file = in_file
    tu.inputs.encoding_file = encoding_file
    tu.inputs.config = config
    tu.inputs.out_base = out_base
    tu.inputs.out_field = f"{out_base}_field.nii.gz"
    tu.inputs.out_corrected = f"{out_base}_corrected.nii.gz"
    tu.inputs.output_type = "NIFTI_GZ"
    return tu


def applytopup_interface(in_files: list[str], encoding_file: str, fieldcoef: str, movpar: str,
                         in_index: list[int], method: str = "jac"):
    """``applytopup`` (Jacobian modulation, one image per acquisition) for the corrected b0 pair."""
    at = fsl.ApplyTOPUP()
    at.inputs.in_files = in_files
    at.inputs.encoding_file = encoding_file
    at.inputs.in_topup_fieldcoef = fieldcoef
    at.inputs.in_topup_movpar = movpar
    at.inputs.in_index = in_index
    at.inputs.method = method
    at.inputs.output_type = "NIFTI_GZ"
    return at


def bet_interface(in_file: str, frac: float = 0.3, out_file: str = "b0_brain.nii.gz"):
    """``bet`` on the corrected mean b0 (mask only; ``-m``)."""
    bet = fsl.BET()
    bet.inputs.in_file = in_file
    bet.inputs.frac = frac
    bet.inputs.mask = True
    bet.inputs.out_file = out_file
    bet.inputs.output_type = "NIFTI_GZ"
    return bet


def eddy_interface(in_file: str, bval: str, bvec: str, mask: str, index: str, acqp: str,
                   topup_base: str | None = None, num_threads: int = 1, repol: bool = True):
    """``eddy`` (CPU ``eddy_cpu``/``eddy_openmp``) with the topup field when there is one."""
    ed = fsl.Eddy()
    ed.inputs.in_file = in_file
    ed.inputs.in_bval = bval
    ed.inputs.in_bvec = bvec
    ed.inputs.in_mask = mask
    ed.inputs.in_index = index
    ed.inputs.in_acqp = acqp
    ed.inputs.repol = repol
    ed.inputs.num_threads = num_threads
    ed.inputs.out_base = "eddy_corrected"
    ed.inputs.use_cuda = False
    if topup_base:
        ed.inputs.in_topup_fieldcoef = f"{topup_base}_fieldcoef.nii.gz"
        ed.inputs.in_topup_movpar = f"{topup_base}_movpar.txt"
    return ed


def eddy_parameters_to_motion(path: str) -> np.ndarray:
    """eddy's ``.eddy_parameters``: first 3 columns translations (mm), next 3 rotations (rad)."""
    params = np.loadtxt(path, ndmin=2)
    return params[:, :6]


class _FSLInputSpec(BaseInterfaceInputSpec):
    dwi_file = File(exists=True, mandatory=True)
    bval_file = File(exists=True, mandatory=True)
    bvec_file = File(exists=True, mandatory=True)
    dwi_metadata = traits.Dict(mandatory=True)
    rpe_file = traits.Str("", usedefault=True)
    rpe_metadata = traits.Dict()
    num_threads = traits.Int(1, usedefault=True)
    bet_frac = traits.Float(0.3, usedefault=True)


class _FSLOutputSpec(TraitedSpec):
    out_file = File(exists=True)
    out_bval = File(exists=True)
    out_bvec = File(exists=True)
    b0_ref = File(exists=True)
    motion_tsv = File(exists=True)
    brain_mask = File(exists=True)
    fieldmap_hz = traits.Str()
    b0_pair_raw = traits.List(traits.Str)
    b0_pair_corrected = traits.List(traits.Str)
    sdc_report = traits.Dict()
    hmc_report = traits.Dict()
    mask_report = traits.Dict()


class FSLDWIPreproc(SimpleInterface):
    """topup (+applytopup) when a reverse-PE image exists, bet, eddy; then the common outputs."""

    input_spec = _FSLInputSpec
    output_spec = _FSLOutputSpec

    def _run_interface(self, runtime):  # pragma: no cover - needs FSL
        import shutil

        import nibabel as nib

        from bids_uad.algorithms.hmc import framewise_displacement
        from bids_uad.algorithms.resample import resample_to_grid, same_grid
        from bids_uad.bids.derivatives import write_tsv
        from bids_uad.bids.gradients import load_gradients
        from bids_uad.interfaces.dwi import MOTION_COLUMNS

        cwd = runtime.cwd
        meta = dict(self.inputs.dwi_metadata)
        dwi_json = sidecar_of(self.inputs.dwi_file)
        img = nib.load(self.inputs.dwi_file)
        gt = load_gradients(self.inputs.bval_file, self.inputs.bvec_file, n_volumes=img.shape[3])
        b0 = np.asarray(img.dataobj[..., int(np.flatnonzero(gt.b0_mask)[0])], np.float32)
        axis, pol = phase_encoding(meta, dwi_json)
        trt = total_readout_time(meta, img.shape[axis], dwi_json)
        acqp = _out(runtime, "acqparams.txt")
        index = _out(runtime, "index.txt")
        Path(index).write_text(" ".join("1" for _ in range(img.shape[3])) + "\n")
        topup_base = None
        self._results.update(fieldmap_hz="", b0_pair_raw=[], b0_pair_corrected=[],
                             sdc_report={"SusceptibilityDistortionCorrection": SDC_SKIPPED})
        if self.inputs.rpe_file:
            rmeta = dict(self.inputs.rpe_metadata or {})
            raxis, rpol = phase_encoding(rmeta, sidecar_of(self.inputs.rpe_file))
            rtrt = total_readout_time(rmeta, img.shape[raxis], sidecar_of(self.inputs.rpe_file))
            rdata, rimg, _ = _b0_mean_of(self.inputs.rpe_file)
            if not same_grid(rimg.shape, rimg.affine, img.shape, img.affine):
                rdata = resample_to_grid(rdata, rimg.affine, img.shape[:3], img.affine)
            Path(acqp).write_text(acqparams_lines(axis, [pol, rpol], [trt, rtrt]))
            raw = [_out(runtime, "b0_dwi.nii.gz"), _out(runtime, "b0_rpe.nii.gz")]
            nib.save(nib.Nifti1Image(b0, img.affine), raw[0])
            nib.save(nib.Nifti1Image(rdata.astype(np.float32), img.affine), raw[1])
            merged = _out(runtime, "b0_pair.nii.gz")
            nib.save(nib.Nifti1Image(np.stack([b0, rdata], -1).astype(np.float32), img.affine), merged)
            topup_base = str(Path(cwd) / "topup")
            tu = topup_interface(merged, acqp, out_base=topup_base).run(cwd=cwd)
            at = applytopup_interface(raw, acqp, tu.outputs.out_fieldcoef, tu.outputs.out_movpar, [1, 2])
            # one image per index: run per file
            corrected = []
            for k, f in enumerate(raw):
                one = applytopup_interface([f], acqp, tu.outputs.out_fieldcoef, tu.outputs.out_movpar, [k + 1])
                one.inputs.out_corrected = _out(runtime, f"b0_corrected_{k}.nii.gz")
                corrected.append(one.run(cwd=cwd).outputs.out_corrected)
            del at
            self._results.update(fieldmap_hz=tu.outputs.out_field, b0_pair_raw=raw, b0_pair_corrected=corrected,
                                 sdc_report={"SusceptibilityDistortionCorrection": "FSL topup",
                                             "SDCSettings": {"config": "b02b0.cnf", "TotalReadoutTime": trt}})
            mean_b0 = _out(runtime, "b0_mean_corrected.nii.gz")
            nib.save(nib.Nifti1Image(np.mean([np.asarray(nib.load(c).dataobj) for c in corrected], 0)
                                     .astype(np.float32), img.affine), mean_b0)
        else:
            Path(acqp).write_text(acqparams_lines(axis, [pol], [trt]))
            mean_b0 = _out(runtime, "b0_mean.nii.gz")
            nib.save(nib.Nifti1Image(b0, img.affine), mean_b0)
        bet = bet_interface(mean_b0, self.inputs.bet_frac, out_file=_out(runtime, "b0_brain.nii.gz")).run(cwd=cwd)
        ed = eddy_interface(self.inputs.dwi_file, self.inputs.bval_file, self.inputs.bvec_file,
                            bet.outputs.mask_file, index, acqp, topup_base, self.inputs.num_threads).run(cwd=cwd)
        out = _out(runtime, "dwi_preproc.nii.gz")
        shutil.copyfile(ed.outputs.out_corrected, out)
        bvec = _out(runtime, "dwi_preproc.bvec")
        shutil.copyfile(ed.outputs.out_rotated_bvecs, bvec)
        bval = _out(runtime, "dwi_preproc.bval")
        shutil.copyfile(self.inputs.bval_file, bval)
        data = np.asarray(nib.load(out).dataobj, np.float32)
        ref = _out(runtime, "dwi_b0ref.nii.gz")
        nib.save(nib.Nifti1Image(data[..., gt.b0_mask].mean(-1), img.affine), ref)
        motion = eddy_parameters_to_motion(ed.outputs.out_parameter)
        fd = framewise_displacement(motion)
        rows = [{**dict(zip(MOTION_COLUMNS[:6], m)), "framewise_displacement": f} for m, f in zip(motion, fd)]
        tsv = _out(runtime, "motion.tsv")
        write_tsv(tsv, rows)
        self._results.update(out_file=out, out_bval=bval, out_bvec=bvec, b0_ref=ref, motion_tsv=tsv,
                             brain_mask=bet.outputs.mask_file,
                             hmc_report={"HeadMotionCorrection": "FSL eddy", "HMCSettings": {"repol": True}},
                             mask_report={"BrainMask": f"FSL bet -f {self.inputs.bet_frac} on the corrected mean b0"})
        return runtime
