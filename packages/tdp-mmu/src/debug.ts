declare const __DEBUG__: boolean | undefined

/**
 * Expensive self-checks run only when true. Builds define `__DEBUG__` as false (tsup), so the
 * checks fold away; tests define it as true. Source consumers without a define get true.
 */
export const DEBUG: boolean = typeof __DEBUG__ === 'undefined' ? true : __DEBUG__
