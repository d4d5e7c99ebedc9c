/*
 * A PKCS#11 module for tests that behaves like a FIPS HSM (CloudHSM, Luna) in the ways that
 * matter to kms-plugin. It forwards every call to the module named by FIPS_SHIM_TARGET
 * (SoftHSM2), except:
 *
 * - C_EncryptInit with CKM_AES_GCM writes a fresh random IV into the caller's pIv before
 *   forwarding: FIPS HSMs ignore the caller's IV and hand back the one they generated there.
 * - With FIPS_SHIM_REFUSE_ECB=1, C_EncryptInit with CKM_AES_ECB fails with
 *   CKR_MECHANISM_INVALID.
 * - While the file named by FIPS_SHIM_STALL_FILE exists, C_Encrypt and C_Decrypt hang, like
 *   a hung HSM. Each call that starts hanging appends a line to that file, so a test can
 *   count how many threads were stuck at once.
 *
 * The variables are read from the environment of the process that loads the module.
 * Built by tests/support/softhsm.rs: cc -shared -fPIC -I/usr/include/p11-kit-1/p11-kit.
 */
#include <dlfcn.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#include "pkcs11.h"

static CK_FUNCTION_LIST shim;
static CK_FUNCTION_LIST_PTR target;
static CK_RV loaded = CKR_GENERAL_ERROR;
static pthread_once_t once = PTHREAD_ONCE_INIT;

static int fill_random(unsigned char *buf, unsigned long len) {
    while (len > 0) {
        ssize_t n = getrandom(buf, len, 0);
        if (n <= 0) {
            return -1;
        }
        buf += n;
        len -= (unsigned long)n;
    }
    return 0;
}

static CK_RV shim_EncryptInit(CK_SESSION_HANDLE session, CK_MECHANISM_PTR mechanism,
                              CK_OBJECT_HANDLE key) {
    if (mechanism != NULL && mechanism->mechanism == CKM_AES_ECB) {
        const char *refuse = getenv("FIPS_SHIM_REFUSE_ECB");
        if (refuse != NULL && strcmp(refuse, "1") == 0) {
            return CKR_MECHANISM_INVALID;
        }
    }
    if (mechanism != NULL && mechanism->mechanism == CKM_AES_GCM &&
        mechanism->pParameter != NULL && mechanism->ulParameterLen == sizeof(CK_GCM_PARAMS)) {
        CK_GCM_PARAMS *params = mechanism->pParameter;
        if (params->pIv != NULL && params->ulIvLen > 0 &&
            fill_random(params->pIv, params->ulIvLen) != 0) {
            return CKR_FUNCTION_FAILED;
        }
    }
    return target->C_EncryptInit(session, mechanism, key);
}

/* Hangs while the stall file exists, after recording this call in it. */
static void stall(void) {
    const char *path = getenv("FIPS_SHIM_STALL_FILE");
    if (path == NULL) {
        return;
    }
    int fd = open(path, O_WRONLY | O_APPEND);
    if (fd < 0) {
        return;
    }
    if (write(fd, "stalled\n", 8) != 8) {
        /* Counting is best effort; the stall is what matters. */
    }
    close(fd);
    while (access(path, F_OK) == 0) {
        usleep(20 * 1000);
    }
}

static CK_RV shim_Encrypt(CK_SESSION_HANDLE session, CK_BYTE_PTR data, CK_ULONG data_len,
                          CK_BYTE_PTR out, CK_ULONG_PTR out_len) {
    stall();
    return target->C_Encrypt(session, data, data_len, out, out_len);
}

static CK_RV shim_Decrypt(CK_SESSION_HANDLE session, CK_BYTE_PTR data, CK_ULONG data_len,
                          CK_BYTE_PTR out, CK_ULONG_PTR out_len) {
    stall();
    return target->C_Decrypt(session, data, data_len, out, out_len);
}

static CK_RV shim_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR list);

static void load(void) {
    const char *path = getenv("FIPS_SHIM_TARGET");
    if (path == NULL) {
        fprintf(stderr, "fips_shim: FIPS_SHIM_TARGET (the module to forward to) is not set\n");
        return;
    }
    void *module = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (module == NULL) {
        fprintf(stderr, "fips_shim: cannot load %s: %s\n", path, dlerror());
        return;
    }
    CK_C_GetFunctionList get = (CK_C_GetFunctionList)dlsym(module, "C_GetFunctionList");
    if (get == NULL || get(&target) != CKR_OK || target == NULL) {
        fprintf(stderr, "fips_shim: %s has no usable C_GetFunctionList\n", path);
        return;
    }
    shim = *target;
    shim.C_GetFunctionList = shim_GetFunctionList;
    shim.C_EncryptInit = shim_EncryptInit;
    shim.C_Encrypt = shim_Encrypt;
    shim.C_Decrypt = shim_Decrypt;
    loaded = CKR_OK;
}

static CK_RV shim_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR list) {
    if (list == NULL) {
        return CKR_ARGUMENTS_BAD;
    }
    pthread_once(&once, load);
    if (loaded != CKR_OK) {
        return loaded;
    }
    *list = &shim;
    return CKR_OK;
}

/* The one exported symbol. */
CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR list) {
    return shim_GetFunctionList(list);
}
