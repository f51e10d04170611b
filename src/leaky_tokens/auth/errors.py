"""Domain errors of the auth service."""

from __future__ import annotations

from leaky_tokens.shared.errors import AppError, Conflict, Forbidden, InvalidRequest, NotFound


class UsernameTaken(InvalidRequest):
    code = "USERNAME_TAKEN"
    default_message = "username already exists"


class EmailTaken(InvalidRequest):
    code = "EMAIL_TAKEN"
    default_message = "email already exists"


class WeakPassword(InvalidRequest):
    code = "WEAK_PASSWORD"


class InvalidCredentials(AppError):
    status = 401
    code = "AUTH_INVALID_CREDENTIALS"
    # One message for an unknown user and a wrong password: no account enumeration.
    default_message = "invalid username or password"


class LoginThrottled(AppError):
    status = 429
    code = "LOGIN_THROTTLED"
    default_message = "too many failed login attempts; try again later"


class ApiKeyNotFound(NotFound):
    code = "API_KEY_NOT_FOUND"
    default_message = "API key not found"


class UserNotFound(NotFound):
    code = "USER_NOT_FOUND"
    default_message = "user not found"


class OrgNotFound(NotFound):
    code = "ORG_NOT_FOUND"
    default_message = "organisation not found"


class NotOrgOwner(Forbidden):
    code = "FORBIDDEN"
    default_message = "only the organisation's owner or an ADMIN may change its members"


class AlreadyMember(Conflict):
    code = "ALREADY_MEMBER"
    default_message = "user is already a member of the organisation"


class CannotRemoveOwner(InvalidRequest):
    code = "CANNOT_REMOVE_OWNER"
    default_message = "the organisation's owner cannot be removed"


class TooManyApiKeys(Conflict):
    code = "API_KEY_LIMIT"
    default_message = "too many active API keys; revoke one first"


class AccountExists(InvalidRequest):
    # One answer whether the username or the email was taken: registration does not say
    # which accounts exist (the plan's 400 is kept).
    code = "ACCOUNT_EXISTS"
    default_message = "username or email already exists"


class RegistrationThrottled(AppError):
    status = 429
    code = "REGISTRATION_THROTTLED"
    default_message = "too many registrations refused from this address; try again later"
