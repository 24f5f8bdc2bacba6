"""Reference values for the Kob-Andersen mixture at density 1.2 from RUMD3 simulation output shipped in gamdpy.

The Roskilde group's gamdpy package (successor of their GPU MD code RUMD) ships, in its 0.8.2 source
distribution on PyPI, the raw output of RUMD3 runs of the Kob-Andersen 80:20 binary LJ mixture. These are
released simulation data of the RUMD3 code, not a table in a paper. Get them with (no build, no dependencies)::

    pip download gamdpy==0.8.2 --no-binary :all: --no-deps && tar xzf gamdpy-0.8.2.tar.gz

and run::

    python systems/data/extract_rumd3_kob_andersen.py gamdpy-0.8.2 [--update systems/data/kob_andersen_reference.json]

which prints the extracted values as JSON and, with ``--update``, stores them under the key "rumd3_gamdpy" of the
reference file (other keys untouched). Needs only the standard library and numpy; a few seconds.

Data used (paths inside the sdist; the TrajectoryFiles/ are also in github.com/jklust/gamdpy, examples/Data/...,
commit e8fc7bc1):

* ``docs/source/examples/Data/NVT_N4000_T2.0_rho1.2_KABLJ_rumd3/``: T = 2.0, density 1.2, N = 4000 (3200 A,
  800 B; box 14.938015938), masses 1, NVT (RUMD ``IntegratorNVT``, Nose-Hoover, T = 2, relaxation time 0.2),
  time step 0.000665413, two consecutive blocks of 2^22 steps (2791 tau), block 1 starting where block 0 ends.
  ``energies_mean.dat`` (means of the per-particle columns ke, pe, p, sxy, sxz, syz, T, Etot, W over both
  blocks), ``TrajectoryFiles/energies000{0,1}.dat.gz`` (the raw energies every 250 steps), ``msd_000b_000b.dat``
  (columns t, MSD_A, MSD_B of block b), ``Fs_000b_000b.dat`` (columns t, F_s,A(q = 7.26), F_s,B(q = 8.31), header
  "# qvalues: 7.26 8.31"), ``TrajectoryFiles/trajectory000b.xyz.gz`` (24 log-spaced frames per block at steps
  0, 1, 2, 4, ..., 2^22: the MSD and F_s files use the block start as the only time origin, as recomputed
  here) and ``restart0000.xyz.gz`` (used to check the cutoff convention).
  WARNING: ``KABLJ_msd_R1.200_T0.800_rumd3.dat`` and ``KABLJ_Fs_R1.200_T0.800_rumd3.dat`` in THIS folder are
  T = 2.0 data despite their names (time step 0.000665; the MSD is the mean of the two block files; the F_s is at
  q = 7.28 and 5.552); they are not used.
* ``docs/source/examples/Data/KABLJ_msd_R1.200_T0.800_rumd3.dat``: a genuine T = 0.8 RUMD3 MSD (columns t,
  MSD_A, MSD_B; time step 0.004, log-spaced lags up to 2^22 steps = 16777 tau). It is the file that gamdpy's
  examples/kablj.py loads as f'Data/KABLJ_msd_R{rho:.3f}_T{temperature:.3f}_rumd3.dat' for rho = 1.2, T = 0.8
  (its source is reproduced in the sdist's htmlcov/z_714eac15f71a9411_kablj_py.html). N, ensemble and the number
  of time origins are not stated.

Potential: each pair cut at 2.5 sigma_ab and SHIFTED to zero there; checked here by recomputing the potential
energy of restart0000.xyz.gz with numpy (the sum of its per-particle "pe" column matches the shifted sum, not
the truncated unshifted one, which is 0.57 eps lower per particle), and its virial (the "vir" column holds
r . f per particle, so W = sum(vir) / 3, matching the energies files' W).

Methods:

* U/N, P, W/N, T_kin: the means in energies_mean.dat; standard error from 16 block means (each raw file cut into
  8 consecutive blocks of ~350 tau, far longer than any correlation time at T = 2). P = rho (T_kin + W/N).
* D_A, D_B: least-squares straight line through the MSD points with t_min <= t <= t_max (unweighted, on the
  log-spaced grid of the file), D = slope / 6. T = 2.0: window 10-2800 tau (tau_alpha = 0.35, MSD ~ 3 sigma^2
  there), each block separately; value = mean of the two blocks, uncertainty = half their difference. T = 0.8
  (one file): window 60-4200 tau (MSD > 2 sigma^2 at 60 tau, tau_alpha ~ 2.7; gamdpy plots the first 21 rows,
  up to 4194 tau); uncertainty = the largest deviation among the windows 30-4200, 120-4200, 60-16800, 250-16800.
* tau_alpha(A) at T = 2.0: F_s,A(q = 7.26, t) = 1/e. Stated method: between the two bracketing points of the
  file (t = 0.3407 and 0.6814), ln F_s interpolated linearly in ln t; value = mean over the two blocks.
  Uncertainty = the largest deviation of any block x interpolation (ln F_s or F_s, each linear in t or in ln t)
  from it. The time grid is coarse (factor 2), so when the reference JSON next to this script holds the
  project's finely sampled independent F_s curve (key "independent"), the bias of each interpolation on this
  very bracket is measured on that curve and reported (tau_A_interpolation_check).
  The effect of q = 7.26 vs the issue's 7.25 is measured on the trajectory frames (same origin, same
  interpolation) and stored separately (Gaussian estimate: tau ~ q^-2, +0.28%).
"""
import argparse
import gzip
import hashlib
import json
import math
from pathlib import Path

import numpy as np

T2_DIR = "docs/source/examples/Data/NVT_N4000_T2.0_rho1.2_KABLJ_rumd3"
T08_MSD = "docs/source/examples/Data/KABLJ_msd_R1.200_T0.800_rumd3.dat"
SIG = np.array([[1.0, 0.8], [0.8, 0.88]])
EPS = np.array([[1.0, 1.5], [1.5, 0.5]])
RC = 2.5
Q_ISSUE = 7.25
WINDOW_T2 = (10.0, 2800.0)
WINDOW_T08 = (60.0, 4200.0)
WINDOWS_T08_ALT = [(30.0, 4200.0), (120.0, 4200.0), (60.0, 16800.0), (250.0, 16800.0)]


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_energies(path):
    """RUMD3 energies file: header '# ioformat=2 N=.. Dt=.. columns=a,b,..', then one row per output."""
    with gzip.open(path, "rt") as f:
        header = f.readline()
        data = np.loadtxt(f)
    meta = dict(kv.split("=", 1) for kv in header.lstrip("#").split())
    return meta["columns"].split(","), float(meta["Dt"]), int(meta["N"]), data


def read_xyz_frames(path):
    """RUMD3 xyz(.gz): per frame a line with N, a header 'key=value ...', then N rows (columns in the header)."""
    with gzip.open(path, "rt") as f:
        lines = f.read().splitlines()
    frames, i = [], 0
    while i < len(lines):
        n = int(lines[i])
        meta = dict(kv.split("=", 1) for kv in lines[i + 1].split())
        cols = meta["columns"].split(",")
        arr = np.array([row.split() for row in lines[i + 2:i + 2 + n]], dtype=float)
        frames.append((meta, {c: arr[:, k] for k, c in enumerate(cols)}))
        i += 2 + n
    return frames


def box_of(meta):
    return float(meta["sim_box"].split(",")[1])


def shifted_energy_and_virial(x, types, box, shifted=True):
    """Total U and W = (1/3) sum_pairs r . f of the KA mixture (all pairs, minimum image, numpy)."""
    u, w = 0.0, 0.0
    n = len(x)
    for start in range(0, n, 250):
        i = np.arange(start, min(start + 250, n))
        d = x[i, None, :] - x[None, :, :]
        d -= box * np.round(d / box)
        r2 = (d * d).sum(-1)
        s = SIG[types[i][:, None], types[None, :]]
        e = EPS[types[i][:, None], types[None, :]]
        mask = (r2 < (RC * s) ** 2) & (np.arange(n)[None, :] > i[:, None])
        sr6 = (s * s / np.where(mask, r2, 1.0)) ** 3
        uu = 4 * e * (sr6 * sr6 - sr6) - (4 * e * (RC ** -12 - RC ** -6) if shifted else 0.0)
        u += uu[mask].sum()
        w += (24 * e * (2 * sr6 * sr6 - sr6))[mask].sum() / 3
    return u, w


def fit_d(t, msd, window):
    sel = (t >= window[0]) & (t <= window[1])
    return float(np.polyfit(t[sel], msd[sel], 1)[0] / 6), int(sel.sum())


def crossing(t, f, level=1 / math.e):
    """1/e crossing with several interpolations between the bracketing points, plus a KWW fit."""
    i = int(np.flatnonzero(f < level)[0])
    t0, t1, f0, f1 = t[i - 1], t[i], f[i - 1], f[i]
    out = {}
    a = (math.log(f0) - math.log(level)) / (math.log(f0) - math.log(f1))
    out["lnF_vs_lnt"] = math.exp(math.log(t0) + a * math.log(t1 / t0))
    out["lnF_vs_t"] = t0 + a * (t1 - t0)
    b = (f0 - level) / (f0 - f1)
    out["F_vs_lnt"] = math.exp(math.log(t0) + b * math.log(t1 / t0))
    out["F_vs_t"] = t0 + b * (t1 - t0)
    out["bracket"] = [float(t0), float(t1)]
    return out


INTERPOLATIONS = ("lnF_vs_lnt", "lnF_vs_t", "F_vs_lnt", "F_vs_t")


def grid_calibration(t_fine, f_fine, t0, t1):
    """Relative error of each two-point interpolation on the bracket (t0, t1) for a finely sampled F_s: the
    fine curve is read at t0 and t1 (ln F linear in ln t between its own points) and the crossings compared."""
    lt, lf = np.log(t_fine), np.log(np.clip(f_fine, 1e-12, None))
    fine = crossing(t_fine, f_fine)["lnF_vs_lnt"]
    coarse = crossing(np.array([t0, t1]), np.exp(np.interp(np.log([t0, t1]), lt, lf)))
    return {k: coarse[k] / fine - 1 for k in INTERPOLATIONS}, fine


def self_functions(frames, types, q):
    """Single-origin (frame 0) MSD and F_s of each type from unwrapped RUMD frames: F_s both as the average of
    cos(q dx_alpha) over the three axes and as the isotropic <sin(q r)/(q r)>."""
    m0, f0 = frames[0]
    box = box_of(m0)
    r0 = np.stack([f0[c] + box * f0["im" + c] for c in "xyz"], axis=1)
    res = {t: {"msd": [], "fs_axes": [], "fs_iso": []} for t in (0, 1)}
    times = []
    dt = float(m0["integrator"].split(",")[1])
    for meta, fr in frames[1:]:
        times.append(int(meta["timeStepIndex"]))
        r = np.stack([fr[c] + box * fr["im" + c] for c in "xyz"], axis=1)
        d = r - r0
        for t in (0, 1):
            dd = d[types == t]
            rr = np.sqrt((dd ** 2).sum(1))
            res[t]["msd"].append(float((rr ** 2).mean()))
            res[t]["fs_axes"].append(float(np.cos(q * dd).mean()))
            res[t]["fs_iso"].append(float(np.sinc(q * rr / np.pi).mean()))
    steps = np.array([2 ** (k - 1) if k > 0 else 0 for k in range(1, len(frames))])
    return np.array(times), steps * dt, {t: {k: np.array(v) for k, v in res[t].items()} for t in res}


def extract(root):
    root = Path(root)
    d2 = root / T2_DIR
    files = {}

    # ---------------------------------------------------------------- energies, T = 2.0
    with open(d2 / "energies_mean.dat") as f:
        cols = f.readline().lstrip("#").split()
        means = dict(zip(cols, map(float, f.readline().split())))
    files["energies_mean.dat"] = sha256(d2 / "energies_mean.dat")
    raw = []
    for b in (0, 1):
        p = d2 / "TrajectoryFiles" / f"energies000{b}.dat.gz"
        c, dt_out, n_particles, data = read_energies(p)
        files[f"TrajectoryFiles/energies000{b}.dat.gz"] = sha256(p)
        raw.append(data)
    col = {k: i for i, k in enumerate(c)}
    allraw = np.concatenate(raw)
    blocks = np.concatenate([d[:len(d) // 8 * 8].reshape(8, -1, d.shape[1]).mean(axis=1) for d in raw])
    se = blocks.std(axis=0, ddof=1) / math.sqrt(len(blocks))
    rho = 4000 / 14.938015938 ** 3
    for k in ("pe", "p", "W", "T"):
        assert abs(allraw[:, col[k]].mean() - means[k]) < 1e-4 * abs(means[k]), (k, allraw[:, col[k]].mean())
    assert abs(rho * (means["T"] + means["W"]) - means["p"]) < 1e-4 * means["p"]

    # ---------------------------------------------------------------- cutoff convention from restart0000
    (meta, fr), = read_xyz_frames(d2 / "TrajectoryFiles" / "restart0000.xyz.gz")
    files["TrajectoryFiles/restart0000.xyz.gz"] = sha256(d2 / "TrajectoryFiles" / "restart0000.xyz.gz")
    x = np.stack([fr["x"], fr["y"], fr["z"]], axis=1)
    types = fr["type"].astype(int)
    box = box_of(meta)
    n = len(x)
    u_sh, w_sh = shifted_energy_and_virial(x, types, box, shifted=True)
    u_un, _ = shifted_energy_and_virial(x, types, box, shifted=False)
    cutoff_check = {"restart0000_pe_column_sum_per_N": float(fr["pe"].sum() / n),
                    "recomputed_shifted_U_per_N": u_sh / n, "recomputed_unshifted_U_per_N": u_un / n,
                    "restart0000_vir_column_sum_per_3N": float(fr["vir"].sum() / (3 * n)),
                    "recomputed_W_per_N": w_sh / n}
    assert abs(u_sh / n - fr["pe"].sum() / n) < 1e-4, cutoff_check
    assert abs(w_sh / n - fr["vir"].sum() / (3 * n)) < 1e-3, cutoff_check   # "vir" holds r . f, W = sum / 3

    # ---------------------------------------------------------------- MSD, D at T = 2.0
    dvals = {"A": [], "B": []}
    msd_files = []
    for b in (0, 1):
        name = f"msd_000{b}_000{b}.dat"
        files[name] = sha256(d2 / name)
        m = np.loadtxt(d2 / name)
        msd_files.append(m)
        for k, s in ((1, "A"), (2, "B")):
            dvals[s].append(fit_d(m[:, 0], m[:, k], WINDOW_T2)[0])
    n_fit = fit_d(msd_files[0][:, 0], msd_files[0][:, 1], WINDOW_T2)[1]

    # ---------------------------------------------------------------- F_s, tau_alpha(A) at T = 2.0
    taus = []
    fs_files = []
    for b in (0, 1):
        name = f"Fs_000{b}_000{b}.dat"
        files[name] = sha256(d2 / name)
        with open(d2 / name) as f:
            q_file = [float(v) for v in f.readline().split(":")[1].split()]
        fs = np.loadtxt(d2 / name)
        fs_files.append(fs)
        taus.append(crossing(fs[:, 0], fs[:, 1]))
    tau_ref = float(np.mean([t["lnF_vs_lnt"] for t in taus]))
    spread = max(abs(t[k] - tau_ref) for t in taus for k in INTERPOLATIONS)
    calibration = None
    ref_path = Path(__file__).with_name("kob_andersen_reference.json")
    if ref_path.exists():
        nve = json.loads(ref_path.read_text()).get("independent", {}).get("T2.0", {}).get("nve")
        if nve:
            err, fine = grid_calibration(np.array(nve["t"]), np.array(nve["fs"])[:, 0], *taus[0]["bracket"])
            calibration = ("applied to the finely sampled F_s,A(q = 7.25) of this project's independent runs "
                           "('independent' block, T = 2.0, frames every 0.025 tau, 1/e crossing %.4f), the "
                           "two-point interpolations on this bracket err by %s" % (
                               fine, ", ".join(f"{k} {100 * v:+.1f}%" for k, v in err.items())))

    # ---------------------------------------------------------------- recompute from the trajectory frames
    traj_check = {"max_rel_dev_msd": 0.0, "max_abs_dev_fs_axes": 0.0, "max_abs_dev_fs_iso": 0.0}
    tau_q = {"7.26": [], "7.25": [], "7.25_isotropic": []}
    for b in (0, 1):
        p = d2 / "TrajectoryFiles" / f"trajectory000{b}.xyz.gz"
        files[f"TrajectoryFiles/trajectory000{b}.xyz.gz"] = sha256(p)
        frames = read_xyz_frames(p)
        ty = frames[0][1]["type"].astype(int)
        _, t, res = self_functions(frames, ty, q_file[0])
        assert np.allclose(t, msd_files[b][:, 0], rtol=1e-4), (t, msd_files[b][:, 0])
        for k, s in ((1, 0), (2, 1)):
            traj_check["max_rel_dev_msd"] = max(traj_check["max_rel_dev_msd"], float(
                np.max(np.abs(res[s]["msd"] / msd_files[b][:, k] - 1)[5:])))   # t >= 0.01: 4-decimal positions
        traj_check["max_abs_dev_fs_axes"] = max(traj_check["max_abs_dev_fs_axes"],
                                                float(np.max(np.abs(res[0]["fs_axes"] - fs_files[b][:, 1]))))
        traj_check["max_abs_dev_fs_iso"] = max(traj_check["max_abs_dev_fs_iso"],
                                               float(np.max(np.abs(res[0]["fs_iso"] - fs_files[b][:, 1]))))
        tau_q["7.26"].append(crossing(t, res[0]["fs_axes"])["lnF_vs_lnt"])
        _, _, res25 = self_functions(frames, ty, Q_ISSUE)
        tau_q["7.25"].append(crossing(t, res25[0]["fs_axes"])["lnF_vs_lnt"])
        tau_q["7.25_isotropic"].append(crossing(t, res25[0]["fs_iso"])["lnF_vs_lnt"])
    q_ratio = float(np.mean(tau_q["7.25"]) / np.mean(tau_q["7.26"]))

    # ---------------------------------------------------------------- mislabelled files (documented, unused)
    mis = np.loadtxt(d2 / "KABLJ_msd_R1.200_T0.800_rumd3.dat")
    mislabel_is_block_mean = bool(np.allclose(mis[:, 1:], 0.5 * (msd_files[0][:, 1:] + msd_files[1][:, 1:]),
                                              rtol=2e-5, atol=1e-8))

    # ---------------------------------------------------------------- T = 0.8 MSD
    m8 = np.loadtxt(root / T08_MSD)
    files_08 = {T08_MSD: sha256(root / T08_MSD)}
    d8 = {}
    for k, s in ((1, "A"), (2, "B")):
        ref, npts = fit_d(m8[:, 0], m8[:, k], WINDOW_T08)
        alt = {f"{a:g}-{b:g}": fit_d(m8[:, 0], m8[:, k], (a, b))[0] for a, b in WINDOWS_T08_ALT}
        d8[s] = (ref, max(abs(v - ref) for v in alt.values()), alt, npts)

    def r(v, digits=6):
        return float(f"{v:.{digits}g}")

    src_pkg = ("gamdpy 0.8.2 source distribution on PyPI (pip download gamdpy==0.8.2 --no-binary :all: "
               "--no-deps), the Roskilde group's package; output of their GPU MD code RUMD3 (rumd.org)")
    t2 = {
        "T": 2.0, "density": r(rho), "N": n, "N_A": int((types == 0).sum()), "N_B": int((types == 1).sum()),
        "box": box, "ensemble": "NVT, RUMD IntegratorNVT (Nose-Hoover) T = 2, relaxation time 0.2; time step "
                                "0.000665413; two consecutive blocks of 2^22 steps (2791 tau)",
        "cutoff": "each pair cut at 2.5 sigma_ab, potential shifted to zero there (checked: restart0000.xyz.gz "
                  "recomputed, see cutoff_check)",
        "source": src_pkg + "; folder " + T2_DIR + " (TrajectoryFiles also in github.com/jklust/gamdpy, "
                  "examples/Data/NVT_N4000_T2.0_rho1.2_KABLJ_rumd3, commit e8fc7bc1)",
        "U_per_N": [r(means["pe"]), r(se[col["pe"]], 2)],
        "P": [r(means["p"]), r(se[col["p"]], 2)],
        "W_per_N": [r(means["W"]), r(se[col["W"]], 2)],
        "T_kinetic": [r(means["T"]), r(se[col["T"]], 2)],
        "thermo_method": "energies_mean.dat columns pe, p, W, T (per particle; p = rho (T + W/N)); standard errors "
                         "from 16 block means of TrajectoryFiles/energies000{0,1}.dat.gz (8 blocks of ~350 tau "
                         "per file; output every %.4g tau)" % dt_out,
        "D_A": [r(np.mean(dvals["A"]), 4), r(abs(dvals["A"][0] - dvals["A"][1]) / 2, 2)],
        "D_B": [r(np.mean(dvals["B"]), 4), r(abs(dvals["B"][0] - dvals["B"][1]) / 2, 2)],
        "D_blocks": {"A": [r(v, 4) for v in dvals["A"]], "B": [r(v, 4) for v in dvals["B"]]},
        "D_method": f"msd_0000_0000.dat and msd_0001_0001.dat (columns t, MSD_A, MSD_B; time origin = block "
                    f"start): unweighted least-squares line through the {n_fit} points with {WINDOW_T2[0]:g} <= t "
                    f"<= {WINDOW_T2[1]:g} tau, D = slope/6; value = mean of the two blocks, uncertainty = half "
                    "their difference. N = 4000: D carries a finite-size (1/L hydrodynamic) term a few % larger "
                    "than at N = 1000",
        "fit_window": list(WINDOW_T2),
        "q_A": q_file[0],
        "tau_A": [r(tau_ref, 4), r(spread, 2)],
        "tau_A_method": "Fs_0000_0000.dat and Fs_0001_0001.dat, column 2 (A, q = 7.26; header '# qvalues: 7.26 "
                        "8.31'; single time origin per block, average of cos(q dx) over the x, y, z axes, "
                        "recomputed from the trajectory, see trajectory_check): F_s,A = 1/e between the "
                        "bracketing points t = %.4f and %.4f, ln F_s linear in ln t, mean of the two blocks; "
                        "uncertainty = largest deviation of any block x interpolation (ln F or F, linear in t or "
                        "ln t) from it" % tuple(taus[0]["bracket"]),
        "tau_A_variants": [{k: (r(v, 4) if not isinstance(v, list) else v) for k, v in t.items()} for t in taus],
        "tau_A_interpolation_check": calibration,
        "tau_A_q7.25_over_q7.26": r(q_ratio, 5),
        "tau_A_q_note": "q = 7.25 (the issue's) vs 7.26 (the file's): recomputed from the trajectory frames, same "
                        "origin and interpolation, tau(7.25)/tau(7.26) = %.4f (Gaussian estimate (7.26/7.25)^2 "
                        "= %.4f); the isotropic <sin(qr)/(qr)> at q = 7.25 gives %s" % (
                            q_ratio, (7.26 / 7.25) ** 2, [r(v, 4) for v in tau_q["7.25_isotropic"]]),
        "trajectory_check": {k: r(v, 3) for k, v in traj_check.items()},
        "cutoff_check": {k: r(v, 7) for k, v in cutoff_check.items()},
        "files_sha256": files,
        "mislabelled_files": "KABLJ_msd_R1.200_T0.800_rumd3.dat and KABLJ_Fs_R1.200_T0.800_rumd3.dat in this "
                             "folder are T = 2.0 data (time step 0.000665; the MSD equals the mean of the two "
                             "block files: %s); not used" % mislabel_is_block_mean,
    }
    t08 = {
        "T": 0.8, "density": 1.2,
        "source": src_pkg + "; file " + T08_MSD + " (the RUMD3 MSD that gamdpy's examples/kablj.py loads for "
                  "rho = 1.200, T = 0.800; its source is in the sdist as htmlcov/z_714eac15f71a9411_kablj_py.html)",
        "columns": "t, MSD_A, MSD_B; time step 0.004, log-spaced lags up to 2^22 steps (16777 tau)",
        "N": "not stated", "ensemble": "not stated (gamdpy's comparison run is NVT)",
        "cutoff": "not stated in the file; the RUMD3 KA runs used by gamdpy are shifted at 2.5 sigma_ab",
        "D_A": [r(d8["A"][0], 4), r(d8["A"][1], 2)],
        "D_B": [r(d8["B"][0], 4), r(d8["B"][1], 2)],
        "D_windows": {"A": {k: r(v, 4) for k, v in d8["A"][2].items()},
                      "B": {k: r(v, 4) for k, v in d8["B"][2].items()}},
        "fit_window": list(WINDOW_T08),
        "D_method": f"unweighted least-squares line through the {d8['A'][3]} points with {WINDOW_T08[0]:g} <= t "
                    f"<= {WINDOW_T08[1]:g} tau, D = slope/6; uncertainty = largest deviation among the windows "
                    + ", ".join(f"{a:g}-{b:g}" for a, b in WINDOWS_T08_ALT),
        "files_sha256": files_08,
    }
    return {
        "description": "RUMD3 simulation output (released data of the RUMD3 code, not a table in a paper) shipped "
                       "in the gamdpy 0.8.2 sdist; extracted by systems/data/extract_rumd3_kob_andersen.py, whose "
                       "docstring gives the methods. Values are [value, uncertainty].",
        "T2.0": t2, "T0.8": t08,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gamdpy_dir", help="unpacked gamdpy-0.8.2 source distribution")
    ap.add_argument("--update", help="reference JSON to store the block in, under the key 'rumd3_gamdpy'")
    args = ap.parse_args()
    block = extract(args.gamdpy_dir)
    print(json.dumps(block, indent=1))
    if args.update:
        path = Path(args.update)
        ref = json.loads(path.read_text())
        ref["rumd3_gamdpy"] = block
        path.write_text(json.dumps(ref, indent=1) + "\n")


if __name__ == "__main__":
    main()
