"""A parametric 12-lead ECG: beats as sums of Gaussians, rhythms as beat times.

Each beat is five Gaussian waves (P, Q, R, S, T) plus an ST-segment plateau. The limb
leads get their amplitudes by projecting a frontal-plane vector per wave onto the hexaxial
lead angles (so I, II, III, aVR, aVL, aVF stay consistent with each other); the precordial
leads follow the usual R-wave progression. Class physiology is a change of that morphology
(MI, HMI) or of the rhythm (AHB). Everything is in millivolts and seconds and is drawn from
a caller-supplied random generator, so one seed gives one ECG.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

LEADS: tuple[str, ...] = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
LEAD_INDEX: dict[str, int] = {lead: i for i, lead in enumerate(LEADS)}
WAVES: tuple[str, ...] = ("P", "Q", "R", "S", "T")
P, Q, R, S, T = range(len(WAVES))

TERRITORIES: dict[str, tuple[str, ...]] = {
    "inferior": ("II", "III", "aVF"),
    "anterior": ("V1", "V2", "V3", "V4"),
    "lateral": ("I", "aVL", "V5", "V6"),
}
"""Coronary territories: the leads that face the infarcted wall."""

RECIPROCAL: dict[str, tuple[str, ...]] = {
    "inferior": ("I", "aVL"),
    "anterior": ("II", "III", "aVF"),
    "lateral": ("III", "aVF"),
}
"""Leads facing the opposite wall, where an acute injury shows as ST depression."""

SAMPLE_RATE = 500
DURATION_S = 10.0

_LIMB_ANGLES = {"I": 0.0, "II": 60.0, "III": 120.0, "aVR": -150.0, "aVL": -30.0, "aVF": 90.0}
_AUGMENTED_GAIN = np.sqrt(3.0) / 2.0  # Goldberger leads see the frontal vector scaled by cos(30 deg)

# Typical precordial amplitudes (mV) for V1..V6, rows P, Q, R, S, T.
_PRECORDIAL = np.array(
    [
        [0.08, 0.08, 0.08, 0.10, 0.10, 0.10],
        [0.00, 0.00, 0.00, -0.05, -0.08, -0.10],
        [0.20, 0.40, 0.75, 1.20, 1.30, 1.00],
        [-0.90, -1.30, -0.90, -0.50, -0.25, -0.10],
        [0.05, 0.45, 0.50, 0.45, 0.35, 0.25],
    ]
)

_J_POINT_S = 0.045
"""Where the ST plateau starts, after the R peak."""


@dataclass(frozen=True, eq=False)
class Morphology:
    """One beat type: per-lead wave amplitudes and the waves' timing around the R peak.

    `amplitudes[w, lead]` is the peak of wave w (mV, signed); `centers[w]` and `widths[w]`
    are the Gaussian's centre and standard deviation (s) at RR = 1 s; the T wave moves
    with sqrt(RR) (Bazett). `st[lead]` is the ST-segment offset (mV, elevation > 0).
    """

    amplitudes: np.ndarray
    centers: np.ndarray
    widths: np.ndarray
    st: np.ndarray


@dataclass(frozen=True, eq=False)
class Rhythm:
    """When beats happen: R-peak times (s), which beats are PVCs, whether atria are organised."""

    name: str
    r_times: np.ndarray
    is_pvc: np.ndarray
    has_p: bool
    fibrillation_mv: float = 0.0

    @property
    def rr(self) -> np.ndarray:
        return np.diff(self.r_times)

    @property
    def rate_bpm(self) -> float:
        return float(60.0 / np.mean(self.rr))


@dataclass(frozen=True, eq=False)
class EcgRecord:
    """A synthetic 12-lead recording (`signals[lead, sample]`, mV) and how it was made."""

    cls: str
    signals: np.ndarray
    fs: int
    rhythm: Rhythm
    morphology: Morphology
    territory: str | None

    @property
    def rate_bpm(self) -> float:
        return self.rhythm.rate_bpm


def _lead_mask(leads: tuple[str, ...]) -> np.ndarray:
    mask = np.zeros(len(LEADS), dtype=bool)
    mask[[LEAD_INDEX[lead] for lead in leads]] = True
    return mask


def _project_frontal(magnitude: float, angle_deg: float) -> np.ndarray:
    """Amplitudes in I, II, III, aVR, aVL, aVF of one frontal-plane vector."""
    out = np.empty(6)
    for i, lead in enumerate(("I", "II", "III", "aVR", "aVL", "aVF")):
        gain = _AUGMENTED_GAIN if lead.startswith("aV") else 1.0
        out[i] = gain * magnitude * np.cos(np.radians(angle_deg - _LIMB_ANGLES[lead]))
    return out


def normal_morphology(rng: np.random.Generator) -> Morphology:
    """A normal beat with a random (normal-range) axis, amplitudes and intervals."""
    axis = rng.uniform(-10.0, 80.0)
    frontal = {
        P: (rng.uniform(0.12, 0.25), rng.uniform(40.0, 70.0)),
        Q: (rng.uniform(0.05, 0.14), axis + rng.uniform(140.0, 180.0)),
        R: (rng.uniform(0.8, 1.6), axis),
        S: (rng.uniform(0.15, 0.40), axis + rng.uniform(150.0, 200.0)),
        T: (rng.uniform(0.25, 0.50), axis + rng.uniform(-25.0, 25.0)),
    }
    amplitudes = np.empty((len(WAVES), len(LEADS)))
    precordial_gain = rng.uniform(0.7, 1.3)
    for wave, (magnitude, angle) in frontal.items():
        amplitudes[wave, :6] = _project_frontal(magnitude, angle)
        jitter = rng.lognormal(0.0, 0.15, size=6)
        amplitudes[wave, 6:] = _PRECORDIAL[wave] * precordial_gain * jitter
    centers = np.array(
        [-rng.uniform(0.14, 0.20), -0.025, 0.0, 0.028, rng.uniform(0.25, 0.30)]
    )
    widths = np.array(
        [rng.uniform(0.018, 0.026), 0.010, rng.uniform(0.009, 0.012), 0.011, rng.uniform(0.040, 0.055)]
    )
    st = np.zeros(len(LEADS))
    # Benign early repolarisation in V2-V3: normal hearts are not all textbook-flat.
    st[[LEAD_INDEX["V2"], LEAD_INDEX["V3"]]] = rng.uniform(0.0, 0.05)
    return Morphology(amplitudes=amplitudes, centers=centers, widths=widths, st=st)


def _infarct_qrs(morph: Morphology, territory: str, rng: np.random.Generator) -> Morphology:
    """Pathological Q waves (deep, >= 40 ms) and lost R amplitude in the territory's leads."""
    mask = _lead_mask(TERRITORIES[territory])
    amplitudes = morph.amplitudes.copy()
    n = int(mask.sum())
    amplitudes[Q, mask] = -rng.uniform(0.25, 0.55, size=n)
    amplitudes[R, mask] = np.abs(amplitudes[R, mask]) * rng.uniform(0.25, 0.6, size=n) + 0.05
    amplitudes[S, mask] *= rng.uniform(0.3, 0.8)
    centers = morph.centers.copy()
    widths = morph.widths.copy()
    centers[Q] = -0.03
    widths[Q] = rng.uniform(0.016, 0.02)
    return replace(morph, amplitudes=amplitudes, centers=centers, widths=widths)


def acute_mi(morph: Morphology, territory: str, rng: np.random.Generator) -> Morphology:
    """Acute MI: ST elevation, Q waves and tall (hyperacute) T waves in one territory."""
    morph = _infarct_qrs(morph, territory, rng)
    mask = _lead_mask(TERRITORIES[territory])
    amplitudes = morph.amplitudes.copy()
    st = morph.st.copy()
    st[mask] = rng.uniform(0.15, 0.45, size=int(mask.sum()))
    amplitudes[T, mask] = np.maximum(amplitudes[T, mask], 0.0) + rng.uniform(0.2, 0.5)
    if rng.random() < 0.7:
        reciprocal = _lead_mask(RECIPROCAL[territory])
        st[reciprocal] = -rng.uniform(0.05, 0.2, size=int(reciprocal.sum()))
    return replace(morph, amplitudes=amplitudes, st=st)


def old_mi(morph: Morphology, territory: str, rng: np.random.Generator) -> Morphology:
    """History of MI: pathological Q waves and inverted T waves in one territory, no ST elevation."""
    morph = _infarct_qrs(morph, territory, rng)
    mask = _lead_mask(TERRITORIES[territory])
    amplitudes = morph.amplitudes.copy()
    st = morph.st.copy()
    amplitudes[T, mask] = -rng.uniform(0.15, 0.45, size=int(mask.sum()))
    st[mask] = -rng.uniform(0.0, 0.05, size=int(mask.sum()))
    return replace(morph, amplitudes=amplitudes, st=st)


def pvc_morphology(rng: np.random.Generator) -> Morphology:
    """A premature ventricular beat: no P, a wide bizarre QRS and a T wave of opposite sign."""
    main = np.empty(len(LEADS))
    main[:6] = _project_frontal(rng.uniform(1.2, 2.2), rng.uniform(0.0, 360.0))
    # Right-ventricular origin looks like LBBB (negative V1, positive V6); left, like RBBB.
    direction = 1.0 if rng.random() < 0.5 else -1.0
    main[6:] = direction * np.linspace(-1.0, 1.0, 6) * rng.uniform(1.0, 2.0) + rng.normal(0, 0.2, 6)
    amplitudes = np.zeros((len(WAVES), len(LEADS)))
    amplitudes[R] = main
    amplitudes[S] = -0.35 * main
    amplitudes[T] = -0.4 * main
    centers = np.array([0.0, 0.0, 0.0, 0.07, rng.uniform(0.30, 0.36)])
    widths = np.array([0.02, 0.01, rng.uniform(0.03, 0.04), 0.03, rng.uniform(0.06, 0.08)])
    return Morphology(amplitudes=amplitudes, centers=centers, widths=widths, st=np.zeros(len(LEADS)))


def _first_beat(rng: np.random.Generator, rr: float) -> float:
    """A first R peak up to one RR before the window, so the strip starts mid-rhythm."""
    return -rng.uniform(0.0, rr)


def sinus_rhythm(rng: np.random.Generator, rate_bpm: float, duration_s: float = DURATION_S) -> Rhythm:
    """Regular sinus rhythm: P before every QRS, RR varying only a few percent (breathing)."""
    rr = 60.0 / rate_bpm
    times = [_first_beat(rng, rr)]
    breathing_hz, breathing_phase = rng.uniform(0.15, 0.3), rng.uniform(0, 2 * np.pi)
    while times[-1] < duration_s + 1.0:
        sway = 0.03 * np.sin(2 * np.pi * breathing_hz * times[-1] + breathing_phase)
        times.append(times[-1] + rr * (1.0 + sway + rng.normal(0.0, 0.01)))
    r_times = np.array(times)
    return Rhythm("sinus", r_times, np.zeros(len(r_times), dtype=bool), has_p=True)


def af_rhythm(rng: np.random.Generator, rate_bpm: float, duration_s: float = DURATION_S) -> Rhythm:
    """Atrial fibrillation: irregularly irregular RR, no P waves, a fibrillatory baseline."""
    mean_rr = 60.0 / rate_bpm
    times = [_first_beat(rng, mean_rr)]
    while times[-1] < duration_s + 1.0:
        times.append(times[-1] + max(0.3, mean_rr * rng.uniform(0.55, 1.45)))
    r_times = np.array(times)
    return Rhythm(
        "af",
        r_times,
        np.zeros(len(r_times), dtype=bool),
        has_p=False,
        fibrillation_mv=rng.uniform(0.03, 0.08),
    )


def pvc_rhythm(rng: np.random.Generator, rate_bpm: float, duration_s: float = DURATION_S) -> Rhythm:
    """Sinus rhythm with premature ventricular beats, each followed by a compensatory pause.

    A PVC comes early (55-70% of the RR) and the next sinus beat lands where it would have
    been anyway, two sinus cycles after the last one. At least one PVC falls in the window.
    """
    rr = 60.0 / rate_bpm
    probability = rng.uniform(0.15, 0.35)
    times, pvc = [_first_beat(rng, rr)], [False]
    while times[-1] < duration_s + 1.0:
        last_sinus = times[-1] if not pvc[-1] else times[-2]
        if pvc[-1]:
            times.append(last_sinus + 2 * rr * (1.0 + rng.normal(0.0, 0.01)))
            pvc.append(False)
        elif rng.random() < probability:
            times.append(last_sinus + rr * rng.uniform(0.55, 0.7))
            pvc.append(True)
        else:
            times.append(last_sinus + rr * (1.0 + rng.normal(0.0, 0.01)))
            pvc.append(False)
    r_times, is_pvc = np.array(times), np.array(pvc)
    visible = (r_times > 0.5) & (r_times < duration_s - 0.5)
    if not (is_pvc & visible).any():
        # Make the sinus beat nearest the middle premature; the pause follows from the next beat.
        i = int(np.argmin(np.abs(r_times - duration_s / 2) + 1e3 * is_pvc))
        i = max(i, 1)
        r_times[i] = r_times[i - 1] + rr * rng.uniform(0.55, 0.7)
        is_pvc[i] = True
    return Rhythm("sinus+pvc", r_times, is_pvc, has_p=True)


def _add_beat(
    signals: np.ndarray, t: np.ndarray, morph: Morphology, r_time: float, rr: float, with_p: bool
) -> None:
    """Add one beat centred on `r_time` (in place); only the samples near it are touched."""
    lo, hi = np.searchsorted(t, [r_time - 0.45, r_time + 0.8])
    if lo >= hi:
        return
    tt = t[lo:hi] - r_time
    centers = morph.centers.copy()
    centers[T] *= np.sqrt(np.clip(rr, 0.4, 1.6))
    for wave in range(len(WAVES)):
        if wave == P and not with_p:
            continue
        shape = np.exp(-0.5 * ((tt - centers[wave]) / morph.widths[wave]) ** 2)
        signals[:, lo:hi] += morph.amplitudes[wave][:, None] * shape[None, :]
    # The ST plateau rises after the J point and merges into the T wave.
    rise = 1.0 / (1.0 + np.exp(-(tt - _J_POINT_S) / 0.006))
    fall = 1.0 / (1.0 + np.exp((tt - centers[T]) / 0.03))
    signals[:, lo:hi] += morph.st[:, None] * (rise * fall)[None, :]


def render_beats(
    morph: Morphology,
    rhythm: Rhythm,
    *,
    pvc: Morphology | None = None,
    duration_s: float = DURATION_S,
    fs: int = SAMPLE_RATE,
) -> np.ndarray:
    """Noise-free 12-lead signals (mV) of a rhythm: `(12, duration_s * fs)`."""
    t = np.arange(int(round(duration_s * fs))) / fs
    signals = np.zeros((len(LEADS), len(t)))
    rrs = np.diff(rhythm.r_times, prepend=rhythm.r_times[0] - np.median(rhythm.rr))
    for r_time, rr, is_pvc in zip(rhythm.r_times, rrs, rhythm.is_pvc):
        if is_pvc:
            if pvc is None:
                raise ValueError("rhythm has PVCs but no PVC morphology was given")
            _add_beat(signals, t, pvc, r_time, rr, with_p=False)
        else:
            _add_beat(signals, t, morph, r_time, rr, with_p=rhythm.has_p)
    return signals


def beat_template(morph: Morphology, *, rr: float = 1.0, fs: int = SAMPLE_RATE) -> tuple[np.ndarray, np.ndarray]:
    """One isolated beat, R peak at t = 0, on a zero baseline: `(t, signals)`, t from -0.4 to 0.8 s.

    For measuring a morphology: ST level at J + 60 ms, Q depth, T polarity.
    """
    t = np.arange(int(-0.4 * fs), int(0.8 * fs) + 1) / fs
    signals = np.zeros((len(LEADS), len(t)))
    _add_beat(signals, t, morph, 0.0, rr, with_p=True)
    return t, signals


def add_artifacts(
    signals: np.ndarray, rng: np.random.Generator, *, fs: int = SAMPLE_RATE, fibrillation_mv: float = 0.0
) -> np.ndarray:
    """What a real recording adds: baseline wander, muscle/electrode noise, AF f-waves."""
    n_leads, n = signals.shape
    t = np.arange(n) / fs
    out = signals * rng.uniform(0.75, 1.25)  # electrode contact and body habitus scale everything
    common = rng.uniform(0.0, 0.12) * np.sin(2 * np.pi * rng.uniform(0.05, 0.4) * t + rng.uniform(0, 2 * np.pi))
    per_lead = rng.uniform(0.0, 0.08, size=(n_leads, 1)) * np.sin(
        2 * np.pi * rng.uniform(0.1, 0.5, size=(n_leads, 1)) * t[None, :]
        + rng.uniform(0, 2 * np.pi, size=(n_leads, 1))
    )
    # The recorder filters at 25 Hz, so the noise that reaches the paper is smooth.
    noise = rng.normal(0.0, rng.uniform(0.005, 0.025), size=(n_leads, n))
    kernel = np.ones(7) / 7.0
    noise = np.apply_along_axis(np.convolve, 1, noise, kernel, mode="same")
    out += common[None, :] + per_lead + noise
    if fibrillation_mv > 0:
        # f-waves: 4-9 Hz, largest in V1 and the inferior leads.
        weights = np.full(n_leads, 0.5)
        weights[[LEAD_INDEX[lead] for lead in ("II", "III", "aVF", "V1")]] = 1.0
        f_waves = np.zeros(n)
        for _ in range(3):
            f_waves += np.sin(2 * np.pi * rng.uniform(4.0, 9.0) * t + rng.uniform(0, 2 * np.pi))
        out += fibrillation_mv / 2.0 * weights[:, None] * f_waves[None, :]
    return out


def synthesize_ecg(
    cls: str,
    rng: np.random.Generator,
    *,
    duration_s: float = DURATION_S,
    fs: int = SAMPLE_RATE,
    artifacts: bool = True,
) -> EcgRecord:
    """A 12-lead recording of class `cls` (MI, HMI, AHB, NORM) with per-recording variation."""
    morph = normal_morphology(rng)
    territory: str | None = None
    pvc: Morphology | None = None
    if cls == "NORM":
        rhythm = sinus_rhythm(rng, rng.uniform(60.0, 100.0), duration_s)
    elif cls in ("MI", "HMI"):
        territory = str(rng.choice(sorted(TERRITORIES)))
        morph = acute_mi(morph, territory, rng) if cls == "MI" else old_mi(morph, territory, rng)
        rhythm = sinus_rhythm(rng, rng.uniform(55.0, 105.0), duration_s)
    elif cls == "AHB":
        if rng.random() < 0.5:
            rhythm = af_rhythm(rng, rng.uniform(75.0, 140.0), duration_s)
        else:
            rhythm = pvc_rhythm(rng, rng.uniform(60.0, 100.0), duration_s)
            pvc = pvc_morphology(rng)
    else:
        raise ValueError(f"unknown class {cls!r}: expected one of MI, HMI, AHB, NORM")
    signals = render_beats(morph, rhythm, pvc=pvc, duration_s=duration_s, fs=fs)
    if artifacts:
        signals = add_artifacts(signals, rng, fs=fs, fibrillation_mv=rhythm.fibrillation_mv)
    return EcgRecord(cls=cls, signals=signals, fs=fs, rhythm=rhythm, morphology=morph, territory=territory)
