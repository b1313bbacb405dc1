// Package pageblob opens the Azure page blob that holds a vhdsync disk and
// speaks the few page-blob operations vhdsync needs (create, properties,
// read, Put Page, Clear Pages). It owns credential selection and turns the
// service's error codes into errors that name the cause and the fix.
//
// Credentials are taken, in this order, from: a SAS in the URL;
// AZURE_STORAGE_CONNECTION_STRING; AZURE_STORAGE_KEY (the account comes from
// the URL); the emulator's well-known development account when the URL
// points at Azurite; Entra ID through azidentity's default credential chain.
package pageblob
