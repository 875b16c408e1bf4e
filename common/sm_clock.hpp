// The SM clock the GPU runs at now, measured on the device (sm_clock.cu).
#pragma once

namespace attn::cuda {

/// MHz of the SM clock over the next `microseconds` of the default stream's time: one thread on one SM counts
/// clock64() cycles against the global timer (%globaltimer) while it spins, after the work already queued.
/// Synchronises with that stream. Both counters are the device's own, so the figure needs no host clock.
double sm_clock_mhz(double microseconds = 100.0);

}  // namespace attn::cuda
