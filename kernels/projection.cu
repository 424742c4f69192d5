#include "kernels/projection.h"
