// Placeholder: filled in by the scoring kernel work.
#ifndef RETRACE_KERNELS_SCORING_H_
#define RETRACE_KERNELS_SCORING_H_
#endif
