// Placeholder: filled in by the projection kernel work.
#ifndef RETRACE_KERNELS_PROJECTION_H_
#define RETRACE_KERNELS_PROJECTION_H_
#endif
