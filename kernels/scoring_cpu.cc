#include "kernels/scoring.h"
